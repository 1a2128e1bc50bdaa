//! Structured output fields of `/v1/chat/completions`: `response_format` (`text`,
//! `json_object`, `json_schema`) and flashmoe's `grammar` extension (a Lark grammar in
//! llguidance's dialect), turned into the request's [`GrammarSpec`]. The grammar itself is
//! compiled by the engine, which answers 400 when it does not compile.
use flashmoe_text::GrammarSpec;
use serde_json::{Map, Value};

use crate::api::{bad, field, type_name};
use crate::error::ApiError;

/// The grammar the answer must match, if any. `response_format` and `grammar` together are
/// refused: only one can hold.
pub fn output_grammar(o: &Map<String, Value>) -> Result<Option<GrammarSpec>, ApiError> {
    let from_format = match field(o, "response_format") {
        None => None,
        Some(Value::Object(f)) => response_format(f)?,
        Some(v) => {
            return Err(bad(
                "response_format",
                format!("expected an object, got {}", type_name(v)),
            ))
        }
    };
    let lark = match field(o, "grammar") {
        None => None,
        Some(Value::String(g)) if g.trim().is_empty() => {
            return Err(bad("grammar", "must not be empty"))
        }
        Some(Value::String(g)) => Some(GrammarSpec::Lark(g.clone())),
        Some(v) => {
            return Err(bad(
                "grammar",
                format!("expected a string (a Lark grammar), got {}", type_name(v)),
            ))
        }
    };
    match (from_format, lark) {
        (Some(_), Some(_)) => Err(bad(
            "grammar",
            "cannot be combined with a `response_format` other than text",
        )),
        (a, b) => Ok(a.or(b)),
    }
}

fn response_format(f: &Map<String, Value>) -> Result<Option<GrammarSpec>, ApiError> {
    match f.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(GrammarSpec::json_object())),
        Some("json_schema") => {
            let key = "response_format.json_schema";
            let Some(Value::Object(js)) = field(f, "json_schema") else {
                return Err(bad(key, "is required: {\"name\": ..., \"schema\": {...}}"));
            };
            if let Some(s) = field(js, "strict") {
                if !s.is_boolean() {
                    return Err(bad(
                        "response_format.json_schema.strict",
                        "expected a boolean",
                    ));
                }
            }
            // `strict: false` is accepted, but the schema is enforced all the same: a
            // constraint that may be broken is not one.
            match field(js, "schema") {
                Some(s @ (Value::Object(_) | Value::Bool(true))) => {
                    Ok(Some(GrammarSpec::JsonSchema(s.clone())))
                }
                None => Ok(Some(GrammarSpec::JsonSchema(Value::Object(Map::new())))),
                Some(v) => Err(bad(
                    "response_format.json_schema.schema",
                    format!("expected a JSON Schema object, got {}", type_name(v)),
                )),
            }
        }
        Some(t) => Err(bad(
            "response_format",
            format!("unknown type `{t}` (text, json_object, json_schema)"),
        )),
        None => Err(bad("response_format", "needs a `type`")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> Result<Option<GrammarSpec>, ApiError> {
        output_grammar(v.as_object().expect("object"))
    }

    #[test]
    fn response_format_and_grammar() {
        assert_eq!(parse(json!({})).unwrap(), None);
        assert_eq!(
            parse(json!({"response_format": {"type": "text"}})).unwrap(),
            None
        );
        assert_eq!(
            parse(json!({"response_format": {"type": "json_object"}})).unwrap(),
            Some(GrammarSpec::json_object())
        );
        let schema = json!({"type": "object", "properties": {"a": {"type": "integer"}}});
        let body = json!({"response_format": {"type": "json_schema",
            "json_schema": {"name": "x", "schema": schema, "strict": true}}});
        assert_eq!(parse(body).unwrap(), Some(GrammarSpec::JsonSchema(schema)));
        assert_eq!(
            parse(json!({"grammar": "start: \"a\""})).unwrap(),
            Some(GrammarSpec::Lark("start: \"a\"".into()))
        );
        for bad_body in [
            json!({"response_format": {"type": "xml"}}),
            json!({"response_format": {"type": "json_schema"}}),
            json!({"response_format": {"type": "json_schema", "json_schema": {"schema": 3}}}),
            json!({"grammar": 5}),
            json!({"grammar": "start: \"a\"", "response_format": {"type": "json_object"}}),
        ] {
            assert!(parse(bad_body.clone()).is_err(), "{bad_body}");
        }
    }
}
