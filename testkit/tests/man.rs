//! The man pages as packaging makes them (`popivr-man DIR`): one per
//! command, and the hand-laid-out EXAMPLES, LOGS and FILES of popivr(1)
//! kept line by line, not refilled mid-sentence.

use std::process::Command;

#[test]
fn the_pages_keep_examples_logs_and_files_as_written() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_popivr-man"))
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut pages: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    pages.sort();
    assert_eq!(
        pages,
        [
            "popivr-check.1",
            "popivr-run.1",
            "popivr-serve.1",
            "popivr.1"
        ]
    );
    let main = std::fs::read_to_string(dir.path().join("popivr.1")).unwrap();
    for section in ["EXAMPLES", "LOGS", "FILES"] {
        let at = main
            .find(&format!(".SH {section}\n.nf\n"))
            .unwrap_or_else(|| panic!("no preformatted {section}:\n{main}"));
        assert!(main[at..].contains("\n.fi\n"), "{section} not closed");
    }
    // A line of EXAMPLES stays one line, its columns intact.
    assert!(
        main.lines()
            .any(|l| l.starts_with("popivr check ")
                && l.contains("validate /etc/asterisk/popivr.conf")),
        "{main}"
    );
    assert!(!main.contains(".SH EXTRA"), "{main}");
    // Rendered, where man is installed: no line of EXAMPLES runs into the
    // next.
    if let Ok(out) = Command::new("man")
        .args(["-l", "-P", "cat"])
        .arg(dir.path().join("popivr.1"))
        .env("MANWIDTH", "100")
        .output()
        && out.status.success()
    {
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.lines()
                .any(|l| l.trim_start().starts_with("popivr check ")
                    && !l.contains("popivr --config")),
            "{text}"
        );
    }
}
