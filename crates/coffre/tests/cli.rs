//! The command line's documentation: the man pages in docs/man are those
//! the CLI definition makes now (the same definition as `--help`), and
//! the shell completions parse in their shells.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_coffre");

fn pages(dir: &Path) -> BTreeMap<String, String> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "1"))
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read_to_string(e.path()).unwrap(),
            )
        })
        .collect()
}

fn generated() -> (tempfile::TempDir, BTreeMap<String, String>) {
    let t = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .arg("manpages")
        .arg(t.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let p = pages(t.path());
    (t, p)
}

/// docs/man is what `coffre manpages` writes today: a change to a
/// command's help without its page fails here.
#[test]
fn man_pages_are_current() {
    let committed = pages(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/man"));
    let (_t, now) = generated();
    let fix = "regenerate: cargo run -p coffre -- manpages docs/man (and remove pages of commands that are gone)";
    let names = |m: &BTreeMap<String, String>| m.keys().cloned().collect::<Vec<_>>();
    assert_eq!(names(&committed), names(&now), "{fix}");
    for (name, text) in &now {
        assert!(committed[name] == *text, "{name} is out of date: {fix}");
    }
}

/// Every visible command has its page, and the page says what `--help`
/// says of it.
#[test]
fn every_command_has_a_page_that_matches_its_help() {
    let (_t, now) = generated();
    assert!(now.len() > 40, "{:?}", now.keys());
    for (name, text) in &now {
        let path: Vec<&str> = name.trim_end_matches(".1").split('-').skip(1).collect();
        // Commands whose names hold a dash: cut where a command is.
        let args = command_path(&path);
        let help = Command::new(BIN)
            .args(&args)
            .arg("--help")
            .output()
            .unwrap();
        assert!(help.status.success(), "coffre {args:?} --help");
        let help = String::from_utf8(help.stdout).unwrap();
        let about = help.lines().next().unwrap().trim().trim_end_matches('.');
        let name_line = text
            .lines()
            .skip_while(|l| !l.starts_with(".SH NAME"))
            .nth(1)
            .map(unroff)
            .unwrap();
        assert!(
            name_line.contains(about),
            "{name}: NAME says {name_line:?}, --help says {about:?}"
        );
        for flag in help
            .lines()
            .filter_map(|l| l.trim_start().strip_prefix("--"))
            .filter_map(|l| l.split([' ', '=', '<', ',']).next())
        {
            assert!(
                text.contains(&format!("\\-\\-{}", flag.replace('-', "\\-"))),
                "{name}: --{flag} is in --help, not in the page"
            );
        }
    }
}

/// The text of a roff line, for the escapes clap_mangen writes.
fn unroff(line: &str) -> String {
    line.replace("\\-", "-")
        .replace("\\*(Aq", "'")
        .replace("\\(aq", "'")
        .replace("\\(lq", "\"")
        .replace("\\(rq", "\"")
        .replace("\\e", "\\")
}

/// Splits a page name's words back into the command path: the longest
/// prefix that `coffre ... --help` accepts at each step.
fn command_path(words: &[&str]) -> Vec<String> {
    let mut path: Vec<String> = Vec::new();
    let mut i = 0;
    while i < words.len() {
        let mut found = None;
        for j in (i + 1..=words.len()).rev() {
            let candidate = words[i..j].join("-");
            let ok = Command::new(BIN)
                .args(&path)
                .arg(&candidate)
                .arg("--help")
                .output()
                .unwrap()
                .status
                .success();
            if ok {
                found = Some((candidate, j));
                break;
            }
        }
        let (c, j) = found.unwrap_or_else(|| panic!("no command for {words:?}"));
        path.push(c);
        i = j;
    }
    path
}

/// Each shell's completions name the commands, and bash (and zsh or fish
/// where installed) parse them.
#[test]
fn completions_parse_in_their_shells() {
    for (shell, checker) in [("bash", "bash"), ("zsh", "zsh"), ("fish", "fish")] {
        let out = Command::new(BIN)
            .args(["completions", shell])
            .output()
            .unwrap();
        assert!(out.status.success(), "{shell}");
        let text = String::from_utf8(out.stdout).unwrap();
        for word in ["doctor", "volume", "enter"] {
            assert!(text.contains(word), "{shell} completions lack {word}");
        }
        let t = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(t.path(), &text).unwrap();
        match Command::new(checker).arg("-n").arg(t.path()).output() {
            Ok(o) => assert!(
                o.status.success(),
                "{checker} -n: {}",
                String::from_utf8_lossy(&o.stderr)
            ),
            // Not installed: bash is, so at least one shell checks.
            Err(_) => assert_ne!(checker, "bash"),
        }
    }
}
