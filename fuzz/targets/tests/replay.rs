//! Replays every committed fuzz input through the function its fuzzer runs: the corpus
//! (`fuzz/corpus/TARGET/`, grown by scripts/fuzz.sh) and the inputs that once crashed
//! (`fuzz/regressions/TARGET/`, one file per fixed crash). A panic names the file.

use std::path::{Path, PathBuf};

use sluice_fuzz_targets::TARGETS;

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Files under `dir` (none if it does not exist), sorted so that runs are alike.
fn files(dir: &Path) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut v: Vec<PathBuf> = rd
        .map(|e| e.expect("corpus entry").path())
        .filter(|p| p.is_file())
        .collect();
    v.sort();
    v
}

fn replay(name: &str) {
    let (_, target) = TARGETS
        .iter()
        .find(|(n, _)| *n == name)
        .expect("a target of that name");
    let corpus = files(&fuzz_dir().join("corpus").join(name));
    let regressions = files(&fuzz_dir().join("regressions").join(name));
    assert!(!corpus.is_empty(), "fuzz/corpus/{name}/ has no seeds");
    let mut failed = Vec::new();
    for path in corpus.iter().chain(&regressions) {
        let data = std::fs::read(path).expect("read a corpus file");
        if std::panic::catch_unwind(|| target(&data)).is_err() {
            failed.push(path.display().to_string());
        }
    }
    assert!(
        failed.is_empty(),
        "{name}: {} of {} inputs panicked: {failed:?}",
        failed.len(),
        corpus.len() + regressions.len()
    );
    eprintln!(
        "{name}: replayed {} corpus and {} regression inputs",
        corpus.len(),
        regressions.len()
    );
}

macro_rules! replay_tests {
    ($($name:ident),* $(,)?) => {
        $(#[test] fn $name() { replay(stringify!($name)); })*

        /// Every target has a test above, and every corpus folder a target.
        #[test]
        fn every_target_is_replayed() {
            let tested = [$(stringify!($name)),*];
            for (name, _) in TARGETS {
                assert!(tested.contains(name), "no replay test for target {name}");
                let bin = fuzz_dir().join("fuzz_targets").join(format!("{name}.rs"));
                assert!(bin.is_file(), "no fuzzer for target {name}: {}", bin.display());
            }
            for kind in ["corpus", "regressions"] {
                let Ok(rd) = std::fs::read_dir(fuzz_dir().join(kind)) else { continue };
                for e in rd {
                    let dir = e.expect("entry").file_name().to_string_lossy().into_owned();
                    assert!(
                        TARGETS.iter().any(|(n, _)| *n == dir),
                        "fuzz/{kind}/{dir}/ belongs to no target"
                    );
                }
            }
        }
    };
}

replay_tests!(
    packet,
    engine_device,
    control_message,
    control_stream,
    datagram,
    punch,
    relay,
    dns,
    terminator,
    policy,
    config,
    revocation,
    connector_record,
);
