//! The routing-trace file against truncation and corruption: a cut tail is reported with its
//! offset and the records before it stay usable (and an append cuts it off first); a damaged
//! byte, a foreign file or another model's header is an error naming the file and offset.
use std::path::PathBuf;

use flashmoe_core::trace::{Header, Phase, RecordParts, Trace, TraceWriter};

fn header() -> Header {
    Header {
        flags: 0,
        layers: 3,
        experts: 16,
        k: 2,
        hidden: 4,
        expert_bytes: 1000,
        moe_layers: vec![0, 2],
        model_id: "tiny".into(),
    }
}

fn temp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("flashmoe-trace-{}-{name}", std::process::id()));
    let _ = std::fs::remove_file(&d);
    d
}

/// Three records (two layers of a 2-token prefill, one decode layer).
fn records() -> Vec<u8> {
    let mut b = Vec::new();
    let parts = [
        (
            0u16,
            0u32,
            Phase::Prefill,
            vec![3u32, 5, 1, 3],
            Some(vec![0.5f32, -1.0]),
        ),
        (2, 0, Phase::Prefill, vec![7, 8, 9, 15], None),
        (0, 2, Phase::Decode, vec![5, 3], Some(vec![2.0])),
    ];
    for (layer, pos, phase, ids, gate) in parts {
        RecordParts {
            request: 4,
            pos,
            layer,
            phase,
            ids: &ids,
            weights: &vec![0.75; ids.len()],
            gate: gate.as_deref(),
            hidden: None,
        }
        .encode(2, &mut b);
    }
    b
}

fn write(name: &str) -> (PathBuf, u64) {
    let p = temp(name);
    let (mut w, note) = TraceWriter::open(&p, &header()).unwrap();
    assert!(note.is_none());
    w.write(&records()).unwrap();
    let len = std::fs::metadata(&p).unwrap().len();
    (p, len)
}

#[test]
fn round_trip() {
    let (p, _) = write("rt");
    let t = Trace::read(&p).unwrap();
    assert_eq!(t.header, header());
    assert_eq!(t.records.len(), 3);
    assert!(t.truncated_at.is_none());
    let r = &t.records[0];
    assert_eq!((r.layer, r.pos, r.t, r.phase), (0, 0, 2, Phase::Prefill));
    assert_eq!(r.ids, [3, 5, 1, 3]);
    assert_eq!(r.used(), [1, 3, 5]);
    assert_eq!(r.weights, [0.75; 4]);
    assert_eq!(r.gate.as_deref(), Some(&[0.5, -1.0][..]));
    assert_eq!(t.records[1].gate, None);
    assert_eq!(t.records[2].phase, Phase::Decode);
    std::fs::remove_file(&p).unwrap();
}

#[test]
fn every_truncation_keeps_the_whole_records_before_it() {
    let (p, len) = write("cut");
    let full = std::fs::read(&p).unwrap();
    let whole = Trace::read(&p).unwrap();
    // Record boundaries: header end, then after each record.
    let header_len = full.len() - records().len();
    for cut in header_len as u64..len {
        std::fs::write(&p, &full[..cut as usize]).unwrap();
        let t = Trace::read(&p).unwrap();
        let at = t.truncated_at.unwrap_or(cut);
        assert!(at <= cut);
        assert_eq!(t.records[..], whole.records[..t.records.len()]);
        let note = t.tail_note();
        if cut != t.good_len {
            let n = note.expect("a cut tail is reported");
            assert!(n.contains(&p.display().to_string()) && n.contains(&format!("offset {at}")));
        }
    }
    // A header cut short is an error naming the file.
    std::fs::write(&p, &full[..header_len - 3]).unwrap();
    let e = Trace::read(&p).unwrap_err().to_string();
    assert!(
        e.contains(&p.display().to_string()) && e.contains("cut short"),
        "{e}"
    );
    std::fs::remove_file(&p).unwrap();
}

#[test]
fn append_cuts_the_torn_tail_then_continues() {
    let (p, len) = write("append");
    let full = std::fs::read(&p).unwrap();
    std::fs::write(&p, &full[..len as usize - 5]).unwrap();
    let (mut w, note) = TraceWriter::open(&p, &header()).unwrap();
    assert!(note.expect("the cut is reported").contains("incomplete"));
    w.write(&records()).unwrap();
    let t = Trace::read(&p).unwrap();
    assert_eq!(t.records.len(), 5, "2 whole + 3 appended");
    assert!(t.truncated_at.is_none());
    // Another model's header is refused.
    let mut other = header();
    other.experts = 32;
    let e = TraceWriter::open(&p, &other).err().unwrap().to_string();
    assert!(e.contains("another model") && e.contains("offset 0"), "{e}");
    std::fs::remove_file(&p).unwrap();
}

#[test]
fn damaged_bytes_are_errors_naming_the_offset() {
    let (p, _) = write("flip");
    let full = std::fs::read(&p).unwrap();
    let header_len = full.len() - records().len();
    // A flipped bit inside the second record's body.
    let first_len = {
        let mut one = Vec::new();
        RecordParts {
            request: 4,
            pos: 0,
            layer: 0,
            phase: Phase::Prefill,
            ids: &[3, 5, 1, 3],
            weights: &[0.75; 4],
            gate: Some(&[0.5, -1.0]),
            hidden: None,
        }
        .encode(2, &mut one);
        one.len()
    };
    let second = header_len + first_len;
    let mut bad = full.clone();
    bad[second + 12] ^= 0x10;
    std::fs::write(&p, &bad).unwrap();
    let e = Trace::read(&p).unwrap_err().to_string();
    assert!(
        e.contains(&p.display().to_string())
            && e.contains(&format!("offset {second}"))
            && e.contains("checksum"),
        "{e}"
    );
    // A damaged length field is not mistaken for a cut tail.
    let mut bad = full.clone();
    bad[second + 5] = 0x7f;
    std::fs::write(&p, &bad).unwrap();
    let e = Trace::read(&p).unwrap_err().to_string();
    assert!(
        e.contains(&format!("offset {}", second + 2)) && e.contains("length"),
        "{e}"
    );
    // A broken record magic.
    let mut bad = full.clone();
    bad[second] = b'X';
    std::fs::write(&p, &bad).unwrap();
    let e = Trace::read(&p).unwrap_err().to_string();
    assert!(
        e.contains(&format!("offset {second}")) && e.contains("magic"),
        "{e}"
    );
    // A damaged header, and a file that is not a trace at all.
    let mut bad = full.clone();
    bad[20] ^= 1;
    std::fs::write(&p, &bad).unwrap();
    let e = Trace::read(&p).unwrap_err().to_string();
    assert!(e.contains("header checksum"), "{e}");
    std::fs::write(&p, b"{\"not\": \"a trace\"}").unwrap();
    let e = Trace::read(&p).unwrap_err().to_string();
    assert!(
        e.contains("not a flashmoe routing trace") && e.contains("offset 0"),
        "{e}"
    );
    std::fs::remove_file(&p).unwrap();
}
