//! Server counters and their Prometheus text exposition (`GET /metrics`).
//! Plain numbers behind a mutex: updated once per request, read once per scrape.
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

use flashmoe_runtime::{Done, FinishReason};

#[derive(Default)]
struct Totals {
    requests: [u64; 3],
    rejected_queue_full: u64,
    client_errors: u64,
    finished: [u64; 4],
    prompt_tokens: u64,
    cached_tokens: u64,
    completion_tokens: u64,
    prefill_seconds: f64,
    decode_seconds: f64,
    ttft_seconds_sum: f64,
    ttft_count: u64,
    last_decode_tok_s: f64,
    expert_fetched: u64,
    expert_bytes_read: u64,
    expert_bytes_cached: u64,
    expert_read_seconds: f64,
}

/// Which endpoint a request hit.
#[derive(Clone, Copy)]
pub enum Endpoint {
    Chat = 0,
    Completions = 1,
    Other = 2,
}

#[derive(Default)]
pub struct Metrics {
    totals: Mutex<Totals>,
    /// Requests accepted and not yet started.
    pub queue_depth: AtomicUsize,
    /// 1 while a generation runs.
    pub busy: AtomicUsize,
    /// HTTP connections open now.
    pub connections_open: AtomicUsize,
    /// Connections answered 503 because `--max-connections` were open.
    pub connections_refused: AtomicU64,
}

impl Metrics {
    fn with<R>(&self, f: impl FnOnce(&mut Totals) -> R) -> R {
        let mut t = match self.totals.lock() {
            Ok(t) => t,
            Err(poisoned) => poisoned.into_inner(),
        };
        f(&mut t)
    }

    pub fn request(&self, e: Endpoint) {
        self.with(|t| t.requests[e as usize] += 1);
    }

    pub fn rejected(&self) {
        self.with(|t| t.rejected_queue_full += 1);
    }

    pub fn client_error(&self) {
        self.with(|t| t.client_errors += 1);
    }

    pub fn finished(&self, d: &Done) {
        self.with(|t| {
            let i = match d.finish_reason {
                FinishReason::Stop => 0,
                FinishReason::Length => 1,
                FinishReason::ToolCalls => 2,
                FinishReason::Cancelled => 3,
            };
            t.finished[i] += 1;
            t.prompt_tokens += d.usage.prompt_tokens as u64;
            t.cached_tokens += d.usage.cached_tokens as u64;
            t.completion_tokens += d.usage.completion_tokens as u64;
            t.prefill_seconds += d.timings.prefill_ms / 1e3;
            t.decode_seconds += d.timings.decode_ms / 1e3;
            if d.usage.completion_tokens > 0 {
                t.ttft_seconds_sum += d.timings.ttft_ms / 1e3;
                t.ttft_count += 1;
            }
            if d.timings.decode_tok_s > 0.0 {
                t.last_decode_tok_s = d.timings.decode_tok_s;
            }
            t.expert_fetched += d.expert_io.fetched;
            t.expert_bytes_read += d.expert_io.bytes_read;
            t.expert_bytes_cached += d.expert_io.bytes_cached;
            t.expert_read_seconds += d.expert_io.read_ns as f64 / 1e9;
        });
    }

    /// The Prometheus text format (version 0.0.4).
    pub fn render(&self) -> String {
        let queue = self.queue_depth.load(Ordering::Relaxed);
        let busy = self.busy.load(Ordering::Relaxed);
        let conns = self.connections_open.load(Ordering::Relaxed);
        let refused = self.connections_refused.load(Ordering::Relaxed);
        self.with(|t| {
            let mut s = String::new();
            let mut metric = |name: &str, kind: &str, help: &str, samples: &[(&str, f64)]| {
                let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} {kind}");
                for (labels, v) in samples {
                    let _ = writeln!(s, "{name}{labels} {v}");
                }
            };
            metric("flashmoe_requests_total", "counter", "Requests received, by endpoint.", &[
                ("{endpoint=\"chat_completions\"}", t.requests[0] as f64),
                ("{endpoint=\"completions\"}", t.requests[1] as f64),
                ("{endpoint=\"other\"}", t.requests[2] as f64),
            ]);
            metric("flashmoe_requests_rejected_total", "counter", "Requests refused with 429 because the queue was full.", &[("", t.rejected_queue_full as f64)]);
            metric("flashmoe_request_errors_total", "counter", "Requests answered with a 4xx error.", &[("", t.client_errors as f64)]);
            metric("flashmoe_generations_total", "counter", "Generations finished, by finish reason.", &[
                ("{finish_reason=\"stop\"}", t.finished[0] as f64),
                ("{finish_reason=\"length\"}", t.finished[1] as f64),
                ("{finish_reason=\"tool_calls\"}", t.finished[2] as f64),
                ("{finish_reason=\"cancelled\"}", t.finished[3] as f64),
            ]);
            metric("flashmoe_prompt_tokens_total", "counter", "Prompt tokens of all generations.", &[("", t.prompt_tokens as f64)]);
            metric("flashmoe_prompt_tokens_cached_total", "counter", "Prompt tokens reused from saved state instead of prefilled.", &[("", t.cached_tokens as f64)]);
            metric("flashmoe_generated_tokens_total", "counter", "Tokens generated.", &[("", t.completion_tokens as f64)]);
            metric("flashmoe_prefill_seconds_total", "counter", "Time spent prefilling prompts.", &[("", t.prefill_seconds)]);
            metric("flashmoe_decode_seconds_total", "counter", "Time spent decoding after the first token.", &[("", t.decode_seconds)]);
            metric("flashmoe_time_to_first_token_seconds", "summary", "Time from the start of a generation to its first token.", &[
                ("_sum", t.ttft_seconds_sum),
                ("_count", t.ttft_count as f64),
            ]);
            metric("flashmoe_decode_tokens_per_second", "gauge", "Decode speed of the last generation.", &[("", t.last_decode_tok_s)]);
            metric("flashmoe_expert_fetches_total", "counter", "Routed experts fetched.", &[("", t.expert_fetched as f64)]);
            // bytes_read counts every expert byte served, the cached ones included: the cached
            // bytes are a part of it, not an addition (summing the two halved the ratio).
            metric("flashmoe_expert_bytes_read_total", "counter", "Expert bytes the forward pass fetched, from the disk or a cache (the cached part is flashmoe_expert_bytes_cached_total).", &[("", t.expert_bytes_read as f64)]);
            metric("flashmoe_expert_bytes_cached_total", "counter", "Part of flashmoe_expert_bytes_read_total served without touching the disk (page cache as measured, RAM or VRAM cache).", &[("", t.expert_bytes_cached as f64)]);
            metric("flashmoe_expert_cache_hit_ratio", "gauge", "Share of the expert bytes fetched since start that a cache (page cache, RAM, VRAM) served: bytes_cached / bytes_read.", &[("", hit_ratio(t.expert_bytes_cached, t.expert_bytes_read))]);
            metric("flashmoe_expert_read_seconds_total", "counter", "Time spent waiting for expert reads.", &[("", t.expert_read_seconds)]);
            metric("flashmoe_queue_depth", "gauge", "Requests waiting for the model.", &[("", queue as f64)]);
            metric("flashmoe_busy", "gauge", "1 while a generation runs.", &[("", busy as f64)]);
            metric("flashmoe_connections_open", "gauge", "HTTP connections open.", &[("", conns as f64)]);
            metric("flashmoe_connections_refused_total", "counter", "Connections answered 503 because --max-connections were open.", &[("", refused as f64)]);
            s
        })
    }
}

/// Cached share of the fetched expert bytes (0 before any fetch; at most 1).
fn hit_ratio(cached: u64, fetched: u64) -> f64 {
    if fetched == 0 {
        0.0
    } else {
        (cached as f64 / fetched as f64).min(1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::hit_ratio;

    #[test]
    fn every_byte_cached_is_a_ratio_of_one() {
        // The counters of a run whose experts all came from the page cache.
        assert_eq!(hit_ratio(1000, 1000), 1.0);
        assert_eq!(hit_ratio(250, 1000), 0.25);
        assert_eq!(hit_ratio(0, 0), 0.0);
    }
}
