//! What coffre reads from `/proc`, whose text workloads partly write (a
//! process's name in `stat`, the paths of mounts in their namespaces in
//! `mountinfo`), from arbitrary text: parsing never panics, a mount
//! table's entries keep their shape, and a path escaped as the kernel
//! escapes it reads back as it was.
#![no_main]

use coffre_sys::proc::{parse_mem_total, parse_mountinfo, parse_stat, unescape};
use libfuzzer_sys::fuzz_target;

/// The kernel's escaping of a path in a mount table (`show_path`: space,
/// tab, newline and backslash as three octal digits).
fn escape(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars() {
        match c {
            ' ' | '\t' | '\n' | '\\' => out.push_str(&format!("\\{:03o}", c as u32)),
            c => out.push(c),
        }
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    // Each entry, written back as the kernel would, reads the same.
    for e in parse_mountinfo(&text) {
        let fields = [&e.dev, &e.options, &e.fstype, &e.super_options];
        if fields.iter().any(|f| f.contains('\r')) {
            continue;
        }
        let point = escape(e.mountpoint.to_str().expect("made from a string"));
        let line = format!(
            "{} 1 {} / {point} {} - {} {} {}\n",
            e.id,
            e.dev,
            e.options,
            e.fstype,
            escape(&e.source),
            e.super_options
        );
        assert_eq!(parse_mountinfo(&line), [e.clone()], "{line:?}");
    }
    // A process named anything: its state and times are read after the
    // last `)`, and a name that holds `) R 1 2` does not move them.
    if let Some(st) = parse_stat(&text) {
        let tail = &text[text.rfind(')').expect("a name") + 1..];
        assert!(tail.trim_start().starts_with(st.state));
    }
    let forged = format!("4242 ({text}) S 1 1 1 0 -1 4194560 100 0 0 0 17 23 0 0 20 0 1 0 5 0 0");
    let st = parse_stat(&forged).expect("a process of any name is read");
    assert_eq!((st.state, st.utime, st.stime), ('S', 17, 23), "{forged:?}");
    if let Some(b) = parse_mem_total(&text) {
        let line = format!("MemTotal:       {} kB\n", b / 1024);
        assert_eq!(parse_mem_total(&line), Some(b));
    }
    // A mount point a workload chose, as the kernel writes it.
    let point = escape(&text);
    assert_eq!(unescape(&point), text, "{point:?}");
    let line = format!("36 35 98:0 / {point} rw,noatime master:1 - ext4 /dev/loop0 rw\n");
    let parsed = parse_mountinfo(&line);
    assert_eq!(parsed.len(), 1, "{line:?}");
    assert_eq!(parsed[0].mountpoint.to_str(), Some(text.as_ref()));
    assert_eq!(
        (parsed[0].fstype.as_str(), parsed[0].source.as_str()),
        ("ext4", "/dev/loop0")
    );
});
