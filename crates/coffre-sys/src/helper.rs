//! The daemon's reading of its helpers' answers (the NFS and LDAP
//! servers: one JSON object per line on their standard output).
//!
//! A helper parses guests' bytes, so it is the process a guest would
//! take over first: it holds no volume key and no CA key, and what it
//! tells the root daemon is believed no further than this module lets
//! it. An answer is an object whose `ok` is `true`, or a refusal whose
//! `error` is shown as told text; failures (`"failed": [[what, why]...]`)
//! are a bounded number of told lines; counters are the names the caller
//! expects, each an integer or a boolean, nothing else. Told text is cut
//! and its control characters escaped ([`crate::shown::told`]): it goes
//! into errors, status and the audit log, where a terminal may read it.
#![deny(unsafe_code)]

use crate::shown::told;
use serde_json::{Map, Value};

/// The most failures kept from one answer (the rest are counted).
pub const MAX_FAILURES: usize = 32;
/// The most characters kept of a failure's subject (a workload, a user).
pub const MAX_WHAT: usize = 64;
/// The most characters kept of an error or a failure's reason.
pub const MAX_WHY: usize = 300;

/// Reads one answer line from the helper `what` ("the NFS server"): the
/// object if its `ok` is `true`; otherwise why not, as told text.
pub fn answer(what: &str, line: &str) -> Result<Value, String> {
    let v: Value = serde_json::from_str(line)
        .map_err(|e| format!("{what}'s answer is not JSON ({})", told(&e.to_string(), 80)))?;
    if !v.is_object() {
        return Err(format!("{what}'s answer is not an object"));
    }
    if v["ok"] == true {
        return Ok(v);
    }
    Err(format!("{what}: {}", text(&v["error"], MAX_WHY)))
}

/// A string the helper sent, as told text; anything else as `?`.
pub fn text(v: &Value, max: usize) -> String {
    v.as_str().map_or_else(|| "?".into(), |s| told(s, max))
}

/// An answer's `"failed": [[what, why]...]`, as lines `what: why`: at
/// most [`MAX_FAILURES`] of them, then one saying how many more there
/// were.
pub fn failures(v: &Value) -> Vec<String> {
    let all = v["failed"].as_array().map_or(&[][..], Vec::as_slice);
    let mut out: Vec<String> = all
        .iter()
        .take(MAX_FAILURES)
        .map(|f| format!("{}: {}", text(&f[0], MAX_WHAT), text(&f[1], MAX_WHY)))
        .collect();
    if all.len() > MAX_FAILURES {
        out.push(format!("and {} more", all.len() - MAX_FAILURES));
    }
    out
}

/// The counters `names` of an answer (its top level or an object in it):
/// each one present as an unsigned integer or a boolean; anything else,
/// and any other name, is left out. Not an object: null (no counters).
pub fn counters(v: &Value, names: &[&str]) -> Value {
    if !v.is_object() {
        return Value::Null;
    }
    let mut out = Map::new();
    for &n in names {
        let x = &v[n];
        if x.is_u64() || x.is_boolean() {
            out.insert(n.to_string(), x.clone());
        }
    }
    Value::Object(out)
}

/// What the `fuzzing` build of the `helper_answer` target checks of one
/// line: answers, refusals, failures and counters keep their bounds.
#[cfg(any(test, fuzzing))]
pub fn fuzz_check(line: &str) {
    let bounded = |s: &str, max: usize| {
        assert!(s.chars().count() <= max, "{} characters", s.chars().count());
        assert!(!s.chars().any(crate::shown::unshown), "{s:?}");
    };
    match answer("the helper", line) {
        Err(e) => bounded(&e, MAX_WHY + 60),
        Ok(v) => {
            assert_eq!(v["ok"], true);
            let f = failures(&v);
            assert!(f.len() <= MAX_FAILURES + 1);
            for l in &f {
                bounded(l, MAX_WHAT + MAX_WHY + 2 + 20);
            }
            let c = counters(&v, &["open", "calls", "ok"]);
            let c = c.as_object().expect("an answer is an object");
            assert!(c.len() <= 3);
            for (k, x) in c {
                assert!(["open", "calls", "ok"].contains(&k.as_str()));
                assert!(x.is_u64() || x.is_boolean());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn an_answer_is_an_object_that_says_ok() {
        let v = answer("the NFS server", r#"{"ok":true,"calls":3}"#).unwrap();
        assert_eq!(v["calls"], 3);
        for (line, why) in [
            (
                "nonsense",
                "the NFS server's answer is not JSON (expected ident at line 1 column 2)",
            ),
            ("[1]", "the NFS server's answer is not an object"),
            (r#"{"ok":"true"}"#, "the NFS server: ?"),
            (
                r#"{"ok":false,"error":"no such share"}"#,
                "the NFS server: no such share",
            ),
        ] {
            assert_eq!(answer("the NFS server", line).unwrap_err(), why, "{line}");
        }
        let e = answer(
            "the NFS server",
            &json!({"ok": false, "error": format!("\x1b]0;pwned\x07{}", "x".repeat(5000))})
                .to_string(),
        )
        .unwrap_err();
        assert!(
            e.starts_with("the NFS server: \\u{1b}]0;pwned\\u{7}xxx"),
            "{e}"
        );
        assert!(e.ends_with('…') && e.chars().count() < MAX_WHY + 40, "{e}");
    }

    #[test]
    fn failures_are_few_and_told() {
        let v = json!({"failed": [["alice", "no such directory"], [3, null], ["b\nc", "d\re"]]});
        assert_eq!(
            failures(&v),
            ["alice: no such directory", "?: ?", "b\\nc: d\\re"]
        );
        let many: Vec<Value> = (0..100).map(|i| json!([format!("w{i}"), "x"])).collect();
        let f = failures(&json!({ "failed": many }));
        assert_eq!(f.len(), MAX_FAILURES + 1);
        assert_eq!(f[MAX_FAILURES], "and 68 more");
        assert!(failures(&json!({"ok": true})).is_empty());
        assert!(failures(&json!({"failed": {"a": 1}})).is_empty());
    }

    #[test]
    fn counters_keep_the_names_asked_for_with_numbers_or_booleans() {
        let v = json!({"open": true, "calls": 7, "refused": -1, "jukebox": "many", "extra": 1});
        assert_eq!(
            counters(&v, &["open", "calls", "refused", "jukebox", "replayed"]),
            json!({"open": true, "calls": 7})
        );
        assert_eq!(counters(&json!([1]), &["calls"]), Value::Null);
        assert_eq!(counters(&Value::Null, &["calls"]), Value::Null);
    }

    #[test]
    fn the_fuzz_check_holds_on_odd_lines() {
        for line in [
            "",
            "{}",
            r#"{"ok":true,"failed":[["\u0000","\u202e"]],"open":1.5,"calls":18446744073709551615}"#,
            r#"{"ok":false,"error":{"deep":[1,2]}}"#,
        ] {
            fuzz_check(line);
        }
    }
}
