//! Replays the committed fuzz corpus and regression inputs through the fuzz targets, without
//! libFuzzer, so every `cargo test` re-checks them.

use std::path::{Path, PathBuf};

/// The files of `fuzz/<dir>/<target>/`, sorted, without `.gitkeep`; none if the directory is
/// missing.
fn inputs(dir: &str, target: &str) -> Vec<PathBuf> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz")
        .join(dir)
        .join(target);
    let Ok(entries) = std::fs::read_dir(&path) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .map(|entry| entry.expect("fuzz input directory is readable").path())
        .filter(|p| p.is_file() && p.file_name().is_some_and(|n| n != ".gitkeep"))
        .collect();
    files.sort();
    files
}

/// Runs `run` on every file, returning the names of those that panicked.
fn panicking(files: &[PathBuf], run: fn(&[u8])) -> Vec<String> {
    files
        .iter()
        .filter(|file| {
            let data = std::fs::read(file).expect("fuzz input file is readable");
            std::panic::catch_unwind(|| run(&data)).is_err()
        })
        .map(|file| file.display().to_string())
        .collect()
}

#[test]
fn topic_match_corpus_and_regressions_pass() {
    let corpus = inputs("corpus", "topic_match");
    assert!(
        !corpus.is_empty(),
        "fuzz/corpus/topic_match is empty or missing: nothing would be checked"
    );
    let mut files = corpus;
    files.extend(inputs("regressions", "topic_match"));
    let failed = panicking(&files, coney::fuzzing::topic_match);
    assert!(
        failed.is_empty(),
        "topic_match panicked on {} of {} inputs: {failed:#?}",
        failed.len(),
        files.len()
    );
}

#[test]
fn record_decode_corpus_and_regressions_pass() {
    let corpus = inputs("corpus", "record_decode");
    assert!(
        !corpus.is_empty(),
        "fuzz/corpus/record_decode is empty or missing: nothing would be checked"
    );
    let mut files = corpus;
    files.extend(inputs("regressions", "record_decode"));
    let failed = panicking(&files, coney::fuzzing::record_decode);
    assert!(
        failed.is_empty(),
        "record_decode panicked on {} of {} inputs: {failed:#?}",
        failed.len(),
        files.len()
    );
}

#[test]
fn store_open_corpus_and_regressions_pass() {
    let corpus = inputs("corpus", "store_open");
    assert!(
        !corpus.is_empty(),
        "fuzz/corpus/store_open is empty or missing: nothing would be checked"
    );
    let mut files = corpus;
    files.extend(inputs("regressions", "store_open"));
    let failed = panicking(&files, coney::fuzzing::store_open);
    assert!(
        failed.is_empty(),
        "store_open panicked on {} of {} inputs: {failed:#?}",
        failed.len(),
        files.len()
    );
}

#[test]
fn publish_properties_corpus_and_regressions_pass() {
    let corpus = inputs("corpus", "publish_properties");
    assert!(
        !corpus.is_empty(),
        "fuzz/corpus/publish_properties is empty or missing: nothing would be checked"
    );
    let mut files = corpus;
    files.extend(inputs("regressions", "publish_properties"));
    let failed = panicking(&files, coney::fuzzing::publish_properties);
    assert!(
        failed.is_empty(),
        "publish_properties panicked on {} of {} inputs: {failed:#?}",
        failed.len(),
        files.len()
    );
}

#[test]
fn headers_match_corpus_and_regressions_pass() {
    let corpus = inputs("corpus", "headers_match");
    assert!(
        !corpus.is_empty(),
        "fuzz/corpus/headers_match is empty or missing: nothing would be checked"
    );
    let mut files = corpus;
    files.extend(inputs("regressions", "headers_match"));
    let failed = panicking(&files, coney::fuzzing::headers_match);
    assert!(
        failed.is_empty(),
        "headers_match panicked on {} of {} inputs: {failed:#?}",
        failed.len(),
        files.len()
    );
}

#[test]
fn field_table_codec_corpus_and_regressions_pass() {
    let corpus = inputs("corpus", "field_table_codec");
    assert!(
        !corpus.is_empty(),
        "fuzz/corpus/field_table_codec is empty or missing: nothing would be checked"
    );
    let mut files = corpus;
    files.extend(inputs("regressions", "field_table_codec"));
    let failed = panicking(&files, coney::fuzzing::field_table_codec);
    assert!(
        failed.is_empty(),
        "field_table_codec panicked on {} of {} inputs: {failed:#?}",
        failed.len(),
        files.len()
    );
}

#[test]
fn queue_commands_corpus_and_regressions_pass() {
    let corpus = inputs("corpus", "queue_commands");
    assert!(
        !corpus.is_empty(),
        "fuzz/corpus/queue_commands is empty or missing: nothing would be checked"
    );
    let mut files = corpus;
    files.extend(inputs("regressions", "queue_commands"));
    let failed = panicking(&files, coney::fuzzing::queue_commands);
    assert!(
        failed.is_empty(),
        "queue_commands panicked on {} of {} inputs: {failed:#?}",
        failed.len(),
        files.len()
    );
}
