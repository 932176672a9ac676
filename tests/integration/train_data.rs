//! Training data (`train::data`, `train::resize`): every source on the committed fixtures of
//! tests/fixtures/train_data (made by tests/fixtures/scripts/train_data_refs.py), the dataset
//! check on broken rows and files, Pillow-exact bicubic resizing, the script's preprocessing, and
//! the resumable epoch sampler.

use crate::common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use candle_core::Device;
use image::RgbImage;
use instruct_pix2pix::model::hub::{HubError, HubSettings};
use instruct_pix2pix::pipeline::image::{load_image, save_image};
use instruct_pix2pix::train::data::{
    CheckLevel, Columns, CropMode, DataError, Dataset, DatasetKind, DatasetOptions, EpochSampler,
    Example, FlipMode, SamplerPosition, prepare_batch, shuffled_indices,
};
use instruct_pix2pix::train::resize::resize_bicubic;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/train_data")
}

/// The fixture examples (name, prompt), as the Python script made them.
const EXAMPLES: [(&str, &str); 6] = [
    ("cat", "make it blue"),
    ("dog", "invert the colors"),
    ("sky", "add clouds"),
    ("sea", "turn it into night"),
    ("hat", "ünïcode prompt ✓"),
    ("car", ""),
];

fn fixture_image(name: &str) -> RgbImage {
    load_image(&fixtures().join("images").join(format!("{name}.png"))).unwrap()
}

/// Asserts that `example` holds fixture example `i`'s images and prompt.
fn assert_is_fixture(example: &Example, i: usize) {
    let (name, prompt) = EXAMPLES[i];
    assert_eq!(example.prompt, prompt, "{}", example.name);
    assert!(
        example.original == fixture_image(name),
        "{}: input image differs from {name}.png",
        example.name
    );
    assert!(
        example.edited == fixture_image(&format!("{name}_edited")),
        "{}: edited image differs from {name}_edited.png",
        example.name
    );
}

fn options() -> DatasetOptions {
    DatasetOptions::default()
}

fn problem_indices(report: &instruct_pix2pix::train::data::CheckReport) -> Vec<usize> {
    report.problems.iter().map(|p| p.index).collect()
}

#[test]
fn bicubic_resize_equals_pillow_exactly() {
    let dir = fixtures().join("resize");
    let sizes = [
        (16, 16),
        (32, 32),
        (64, 64),
        (100, 100),
        (7, 7),
        (50, 20),
        (20, 50),
        (41, 29),
        (5, 60),
    ];
    let mut compared = 0;
    for source in ["a", "b", "c"] {
        let src = load_image(&dir.join(format!("src_{source}.png"))).unwrap();
        for (w, h) in sizes {
            let expected = load_image(&dir.join(format!("{source}_{w}x{h}.png"))).unwrap();
            let ours = resize_bicubic(&src, w, h);
            assert_eq!(ours.dimensions(), (w, h));
            let differing = ours
                .as_raw()
                .iter()
                .zip(expected.as_raw())
                .filter(|(a, b)| a != b)
                .count();
            // Exact: Pillow's integer arithmetic is reproduced bit for bit.
            assert_eq!(
                differing,
                0,
                "src_{source} {}x{} -> {w}x{h}: {differing} bytes differ from Pillow",
                src.width(),
                src.height()
            );
            compared += 1;
        }
    }
    assert_eq!(compared, 27);
}

#[test]
fn imagefolder_reads_metadata_rows_lazily() {
    let dataset = Dataset::open_image_folder(&fixtures().join("imagefolder"), &options()).unwrap();
    assert!(matches!(dataset.kind(), DatasetKind::ImageFolder(p) if p.ends_with("metadata.jsonl")));
    assert_eq!(dataset.len(), 3);
    // Out of order on purpose: nothing depends on reading in sequence.
    for i in [2, 0, 1] {
        let example = dataset.load(i).unwrap();
        assert_is_fixture(&example, i);
        assert!(
            example.name.contains(&format!("line {}", i + 1)),
            "{}",
            example.name
        );
    }
    // --train_data_dir finds the imagefolder too.
    let same = Dataset::open_train_data_dir(&fixtures().join("imagefolder"), &options()).unwrap();
    assert_eq!(same.len(), 3);
    assert!(same.check(CheckLevel::Decode).is_clean());
}

#[test]
fn imagefolder_split_folder_with_custom_columns() {
    let dir = fixtures().join("imagefolder_split");
    // The default column names are not there: the error names the column and lists the others.
    let err = Dataset::open_train_data_dir(&dir, &options()).unwrap_err();
    match &err {
        DataError::MissingColumn {
            column, available, ..
        } => {
            assert_eq!(column, "input_image");
            assert_eq!(available, "dst, instr, src");
        }
        other => panic!("expected MissingColumn, got {other}"),
    }
    let columns = Columns {
        original_image: "src".into(),
        edit_prompt: "instr".into(),
        edited_image: "dst".into(),
    };
    let opts = DatasetOptions {
        columns,
        ..options()
    };
    let dataset = Dataset::open_train_data_dir(&dir, &opts).unwrap();
    assert_eq!(dataset.len(), 3);
    for i in 0..3 {
        assert_is_fixture(&dataset.load(i).unwrap(), 3 + i);
    }
}

#[test]
fn imagefolder_check_lists_every_bad_row_by_name() {
    let dataset =
        Dataset::open_image_folder(&fixtures().join("imagefolder_broken"), &options()).unwrap();
    // Six non-blank lines: good, missing file, text file named .png, truncated PNG, bad JSON,
    // no prompt column.
    assert_eq!(dataset.len(), 6);

    let quick = dataset.check(CheckLevel::Headers);
    assert_eq!(quick.total, 6);
    // The truncated PNG has a valid header: only decoding finds it.
    assert_eq!(quick.good, vec![0, 3]);
    assert_eq!(problem_indices(&quick), vec![1, 2, 4, 5]);
    let reason = |report: &instruct_pix2pix::train::data::CheckReport, i: usize| {
        report
            .problems
            .iter()
            .find(|p| p.index == i)
            .map(|p| format!("{}: {}", p.name, p.reason))
            .unwrap()
    };
    assert!(
        reason(&quick, 1).contains("missing.png"),
        "{}",
        reason(&quick, 1)
    );
    assert!(
        reason(&quick, 1).contains("not found"),
        "{}",
        reason(&quick, 1)
    );
    assert!(
        reason(&quick, 2).contains("not_an_image.png"),
        "{}",
        reason(&quick, 2)
    );
    assert!(
        reason(&quick, 2).contains("not a supported image"),
        "{}",
        reason(&quick, 2)
    );
    assert!(
        reason(&quick, 4).contains("line 5"),
        "{}",
        reason(&quick, 4)
    );
    assert!(
        reason(&quick, 4).contains("not a JSON object"),
        "{}",
        reason(&quick, 4)
    );
    assert!(
        reason(&quick, 5).contains("edit_prompt"),
        "{}",
        reason(&quick, 5)
    );

    let mut calls = Vec::new();
    let full =
        dataset.check_with_progress(CheckLevel::Decode, |done, total| calls.push((done, total)));
    assert_eq!(calls.len(), 6);
    assert_eq!(calls.last(), Some(&(6, 6)));
    assert_eq!(full.good, vec![0]);
    assert_eq!(problem_indices(&full), vec![1, 2, 3, 4, 5]);
    assert!(
        reason(&full, 3).contains("truncated.png"),
        "{}",
        reason(&full, 3)
    );
    assert!(
        full.to_string().starts_with("6 examples: 1 good, 5 bad"),
        "{full}"
    );

    // Loading a bad example is an error naming it, never a panic.
    for i in 1..6 {
        match dataset.load(i) {
            Err(DataError::BadExample { index, name, .. }) => {
                assert_eq!(index, i);
                assert!(name.contains(&format!("line {}", i + 1)), "{name}");
            }
            other => panic!("example {i}: expected BadExample, got {other:?}"),
        }
    }
    assert!(matches!(
        dataset.load(6),
        Err(DataError::OutOfRange { index: 6, len: 6 })
    ));

    // Skipping the bad ones: a dataset of the good examples only.
    let good = dataset.subset(&full.good).unwrap();
    assert_eq!(good.len(), 1);
    assert_eq!(good.load(0).unwrap().prompt, "good row");
    assert!(good.check(CheckLevel::Decode).is_clean());
}

#[test]
fn pairs_folder_pairs_by_name() {
    let dataset = Dataset::open_train_data_dir(&fixtures().join("pairs"), &options()).unwrap();
    assert!(matches!(dataset.kind(), DatasetKind::Pairs(_)));
    assert_eq!(dataset.len(), 2);
    // File-name order: cat, dog (the prompt files end with a newline, which is trimmed).
    for (i, (name, _)) in EXAMPLES.iter().enumerate().take(2) {
        let example = dataset.load(i).unwrap();
        assert_eq!(example.name, *name);
        assert_is_fixture(&example, i);
    }
}

#[test]
fn pairs_accept_any_image_extension_on_either_side() {
    let dir = tempfile::tempdir().unwrap();
    let original = fixture_image("sky");
    let edited = fixture_image("sky_edited");
    // Lossless WebP for the input, PNG with an upper-case extension for the edited image.
    save_image(&dir.path().join("sky.webp"), &original, &[]).unwrap();
    std::fs::copy(
        fixtures().join("images/sky_edited.png"),
        dir.path().join("sky_edited.PNG"),
    )
    .unwrap();
    std::fs::write(dir.path().join("sky.txt"), "  add clouds\n\n").unwrap();
    // JPEG on both sides for a second pair.
    save_image(&dir.path().join("b.jpeg"), &original, &[]).unwrap();
    save_image(&dir.path().join("b_edited.jpg"), &edited, &[]).unwrap();
    std::fs::write(dir.path().join("b.txt"), "jpeg pair").unwrap();
    // Ignored: hidden files, other extensions.
    std::fs::write(dir.path().join(".hidden.txt"), "x").unwrap();
    std::fs::write(dir.path().join("readme.md"), "x").unwrap();

    let dataset = Dataset::open_pairs(dir.path(), &options()).unwrap();
    assert_eq!(dataset.len(), 2);
    let b = dataset.load(0).unwrap();
    assert_eq!((b.name.as_str(), b.prompt.as_str()), ("b", "jpeg pair"));
    assert_eq!(b.original, load_image(&dir.path().join("b.jpeg")).unwrap());
    assert_eq!(
        b.edited,
        load_image(&dir.path().join("b_edited.jpg")).unwrap()
    );
    let sky = dataset.load(1).unwrap();
    assert_eq!(sky.prompt, "add clouds");
    assert!(sky.original == original);
    assert!(sky.edited == edited);
}

#[test]
fn pairs_check_lists_incomplete_and_ambiguous_pairs() {
    let dataset = Dataset::open_pairs(&fixtures().join("pairs_broken"), &options()).unwrap();
    let names: Vec<String> = (0..dataset.len())
        .map(|i| dataset.name(i).unwrap())
        .collect();
    // notes.md and the sub-folder are ignored.
    assert_eq!(names, ["good", "lonely", "noprompt", "twice"]);
    let report = dataset.check(CheckLevel::Decode);
    assert_eq!(report.good, vec![0]);
    let reasons: Vec<(String, String)> = report
        .problems
        .iter()
        .map(|p| (p.name.clone(), p.reason.clone()))
        .collect();
    assert_eq!(reasons.len(), 3);
    assert_eq!(
        reasons[0].1,
        "no input image (lonely.png, .jpg, .jpeg or .webp)"
    );
    assert!(reasons[1].1.contains("no noprompt.txt"), "{reasons:?}");
    assert!(
        reasons[2]
            .1
            .contains("more than one input image: twice.jpg, twice.png"),
        "{reasons:?}"
    );
    assert_is_fixture(&dataset.load(0).unwrap(), 0);
}

/// Issue 16 item 5: FIFOs among the examples (an image, a prompt file) are bad examples named
/// by the check, which reads them not at all (a FIFO would block it forever).
#[test]
fn special_files_in_a_dataset_are_bad_examples() {
    let dir = tempfile::tempdir().unwrap();
    crate::train_dataset::write_invert_dataset(dir.path(), 3, 16, 1);
    for name in ["ex001_edited.png", "ex002.txt"] {
        let path = dir.path().join(name);
        std::fs::remove_file(&path).unwrap();
        let status = std::process::Command::new("mkfifo")
            .arg(&path)
            .status()
            .unwrap();
        assert!(status.success());
    }
    let dataset = Dataset::open_pairs(dir.path(), &options()).unwrap();
    for level in [CheckLevel::Headers, CheckLevel::Decode] {
        let report = dataset.check(level);
        assert_eq!(report.good, vec![0], "{:?}", report.problems);
        assert_eq!(report.problems.len(), 2, "{:?}", report.problems);
        for problem in &report.problems {
            assert!(problem.reason.contains("FIFO"), "{problem:?}");
        }
    }
}

#[test]
fn empty_or_missing_folders_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("notes.md"), "x").unwrap();
    assert!(matches!(
        Dataset::open_train_data_dir(dir.path(), &options()),
        Err(DataError::NotADataset { .. })
    ));
    assert!(matches!(
        Dataset::open_train_data_dir(&dir.path().join("nope"), &options()),
        Err(DataError::NotFound { .. })
    ));
    assert!(matches!(
        Dataset::open_parquet_folder(dir.path(), &options()),
        Err(DataError::NotADataset { .. })
    ));
}

#[test]
fn parquet_dataset_reads_the_train_split_row_by_row() {
    let dataset = Dataset::open_parquet_folder(&fixtures().join("parquet"), &options()).unwrap();
    match dataset.kind() {
        DatasetKind::Parquet(files) => {
            let names: Vec<_> = files
                .iter()
                .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
                .collect();
            // test-00000-of-00001.parquet is another split.
            assert_eq!(
                names,
                [
                    "train-00000-of-00002.parquet",
                    "train-00001-of-00002.parquet"
                ]
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(dataset.len(), 6);
    assert_eq!(
        dataset.name(3).unwrap(),
        "data/train-00000-of-00002.parquet row 3"
    );
    assert_eq!(
        dataset.name(5).unwrap(),
        "data/train-00001-of-00002.parquet row 1"
    );
    // Rows from different files and row groups (2 rows each), in any order.
    for i in [5, 0, 3, 2, 4, 1] {
        assert_is_fixture(&dataset.load(i).unwrap(), i);
    }
    let report = dataset.check(CheckLevel::Decode);
    assert!(report.is_clean(), "{report}");
    assert_eq!(report.good, (0..6).collect::<Vec<_>>());
    // Without keeping any row group in memory, every read goes to the file again.
    dataset.set_row_group_cache_bytes(0);
    for i in [4, 1, 5] {
        assert_is_fixture(&dataset.load(i).unwrap(), i);
    }
}

#[test]
fn parquet_check_lists_bad_rows() {
    let dataset =
        Dataset::open_parquet_folder(&fixtures().join("parquet_broken"), &options()).unwrap();
    assert_eq!(dataset.len(), 5);
    for level in [CheckLevel::Headers, CheckLevel::Decode] {
        let report = dataset.check(level);
        assert_eq!(report.good, vec![0, 4], "{report}");
        assert_eq!(problem_indices(&report), vec![1, 2, 3]);
        let text = report.to_string();
        assert!(text.contains("train.parquet row 1: "), "{text}");
        assert!(text.contains("not a supported image"), "{text}");
        assert!(
            text.contains("row 2: column \"input_image\" is empty (null)"),
            "{text}"
        );
        assert!(
            text.contains("row 3: column \"edit_prompt\" is empty (null)"),
            "{text}"
        );
    }
    assert_is_fixture(&dataset.load(0).unwrap(), 0);
    assert_is_fixture(&dataset.load(4).unwrap(), 2);
    match dataset.load(1) {
        Err(e @ DataError::BadExample { .. }) => {
            assert!(
                e.to_string().contains("train.parquet row 1 input_image"),
                "{e}"
            );
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn parquet_missing_column_is_an_error_naming_it() {
    let opts = DatasetOptions {
        columns: Columns {
            edit_prompt: "instruction".into(),
            ..Columns::default()
        },
        ..options()
    };
    match Dataset::open_parquet_folder(&fixtures().join("parquet"), &opts) {
        Err(DataError::MissingColumn {
            column, available, ..
        }) => {
            assert_eq!(column, "instruction");
            assert_eq!(available, "edit_prompt, edited_image, input_image");
        }
        other => panic!("{other:?}"),
    }
}

/// A Hugging Face cache holding the fixture Parquet dataset as `owner/tiny-edits` at commit `sha`.
fn fake_dataset_cache(sha: &str) -> (tempfile::TempDir, HubSettings) {
    let cache = tempfile::tempdir().unwrap();
    let repo = cache.path().join("datasets--owner--tiny-edits");
    let snapshot = repo.join("snapshots").join(sha).join("data");
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::create_dir_all(repo.join("blobs")).unwrap();
    for entry in std::fs::read_dir(fixtures().join("parquet/data")).unwrap() {
        let entry = entry.unwrap();
        // As huggingface_hub stores them: blobs, linked from the snapshot.
        let blob = repo.join("blobs").join(entry.file_name());
        std::fs::copy(entry.path(), &blob).unwrap();
        std::os::unix::fs::symlink(&blob, snapshot.join(entry.file_name())).unwrap();
    }
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), sha).unwrap();
    let settings = HubSettings {
        endpoint: "http://127.0.0.1:9".to_string(),
        cache_dir: cache.path().to_path_buf(),
        token: None,
        offline: true,
    };
    (cache, settings)
}

#[test]
fn dataset_name_resolves_a_cached_hub_dataset_and_local_folders() {
    let sha = "0123456789abcdef0123456789abcdef01234567";
    let (cache, hub) = fake_dataset_cache(sha);
    let by_id = Dataset::open_dataset_name("owner/tiny-edits", None, &hub, &options()).unwrap();
    assert_eq!(by_id.len(), 6);
    assert_is_fixture(&by_id.load(4).unwrap(), 4);
    let by_commit =
        Dataset::open_dataset_name("owner/tiny-edits", Some(sha), &hub, &options()).unwrap();
    assert_eq!(by_commit.len(), 6);

    // The cache folder itself, and a snapshot folder, as local paths.
    let repo = cache.path().join("datasets--owner--tiny-edits");
    let by_folder =
        Dataset::open_dataset_name(repo.to_str().unwrap(), None, &hub, &options()).unwrap();
    assert_eq!(by_folder.len(), 6);
    let snapshot = repo.join("snapshots").join(sha);
    let by_snapshot =
        Dataset::open_dataset_name(snapshot.to_str().unwrap(), None, &hub, &options()).unwrap();
    assert_eq!(by_snapshot.len(), 6);
    // A local imagefolder given as --dataset_name.
    let folder = fixtures().join("imagefolder");
    let local =
        Dataset::open_dataset_name(folder.to_str().unwrap(), None, &hub, &options()).unwrap();
    assert_eq!(local.len(), 3);

    // A cached Hub dataset in imagefolder form (no Parquet files).
    let snapshot = cache
        .path()
        .join("datasets--owner--folder-edits/snapshots")
        .join(sha);
    std::fs::create_dir_all(snapshot.join("img")).unwrap();
    for entry in std::fs::read_dir(fixtures().join("imagefolder/img")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), snapshot.join("img").join(entry.file_name())).unwrap();
    }
    std::fs::copy(
        fixtures().join("imagefolder/metadata.jsonl"),
        snapshot.join("metadata.jsonl"),
    )
    .unwrap();
    std::fs::create_dir_all(cache.path().join("datasets--owner--folder-edits/refs")).unwrap();
    std::fs::write(
        cache.path().join("datasets--owner--folder-edits/refs/main"),
        sha,
    )
    .unwrap();
    let folder_repo =
        Dataset::open_dataset_name("owner/folder-edits", None, &hub, &options()).unwrap();
    assert!(matches!(folder_repo.kind(), DatasetKind::ImageFolder(_)));
    assert_is_fixture(&folder_repo.load(1).unwrap(), 1);

    // Offline, a dataset that is not cached is an error naming it and saying why.
    match Dataset::open_dataset_name("owner/not-cached", None, &hub, &options()) {
        Err(e @ DataError::Hub(_)) => {
            let text = e.to_string();
            assert!(text.contains("dataset owner/not-cached"), "{text}");
            assert!(text.contains("HF_HUB_OFFLINE"), "{text}");
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        Dataset::open_dataset_name("owner/tiny-edits", Some("v2"), &hub, &options()),
        Err(DataError::Hub(e)) if matches!(*e, HubError::NotCached { .. })
    ));
    assert!(matches!(
        Dataset::open_dataset_name("not a dataset", None, &hub, &options()),
        Err(DataError::InvalidName { .. })
    ));
}

/// A fake Hub serving the fixture Parquet dataset (train and test splits, plus a README and a
/// .gitattributes as real dataset repos have) as `owner/tiny-edits`.
fn hub_dataset(sha: &str) -> common::fake_hub::FakeRepo {
    let mut repo = common::fake_hub::FakeRepo::from_folder(
        "datasets/owner/tiny-edits",
        sha,
        &fixtures().join("parquet"),
    );
    repo.files
        .insert("README.md".into(), b"# tiny edits\n".to_vec());
    repo.files
        .insert(".gitattributes".into(), b"*.parquet filter=lfs\n".to_vec());
    repo
}

#[test]
fn dataset_name_downloads_a_hub_dataset_into_the_cache() {
    use common::fake_hub::FakeHub;
    let sha = "4444444444444444444444444444444444444444";
    let hub = FakeHub::start(vec![hub_dataset(sha)]);
    let cache = tempfile::tempdir().unwrap();
    let settings = hub.settings(cache.path());
    let mut files_seen = Vec::new();
    let dataset = Dataset::fetch_dataset_name(
        "owner/tiny-edits",
        None,
        &settings,
        &options(),
        &mut |p| {
            if files_seen.last() != Some(&(p.file.clone(), p.file_count)) {
                files_seen.push((p.file.clone(), p.file_count));
            }
        },
        &AtomicBool::new(false),
    )
    .unwrap();
    // The train split only, every example as the Python script wrote it.
    assert_eq!(dataset.len(), 6);
    for i in 0..6 {
        assert_is_fixture(&dataset.load(i).unwrap(), i);
    }
    let train = [
        "data/train-00000-of-00002.parquet",
        "data/train-00001-of-00002.parquet",
    ];
    assert_eq!(
        files_seen,
        train.map(|f| (f.to_string(), 2)).to_vec(),
        "progress names each file, of 2"
    );
    let downloaded: BTreeSet<String> = hub.resolved_files().into_iter().collect();
    assert_eq!(downloaded, train.map(String::from).into_iter().collect());
    // In huggingface_hub's layout, where `datasets.load_dataset` would find it too.
    let repo_dir = cache.path().join("datasets--owner--tiny-edits");
    assert_eq!(
        std::fs::read_to_string(repo_dir.join("refs/main")).unwrap(),
        sha
    );
    for file in train {
        assert!(repo_dir.join("snapshots").join(sha).join(file).is_file());
    }

    // Again: nothing is downloaded twice; offline, the cache alone serves it.
    let requests = hub.resolved_files().len();
    let again =
        Dataset::open_dataset_name("owner/tiny-edits", None, &settings, &options()).unwrap();
    assert_eq!(again.len(), 6);
    assert_eq!(hub.resolved_files().len(), requests);
    let offline = HubSettings {
        offline: true,
        ..settings.clone()
    };
    let cached =
        Dataset::open_dataset_name("owner/tiny-edits", None, &offline, &options()).unwrap();
    assert_eq!(cached.len(), 6);

    // A stop request before the download cancels it; an unknown dataset is named.
    let fresh = tempfile::tempdir().unwrap();
    let fresh_settings = HubSettings {
        cache_dir: fresh.path().to_path_buf(),
        ..settings.clone()
    };
    match Dataset::fetch_dataset_name(
        "owner/tiny-edits",
        None,
        &fresh_settings,
        &options(),
        &mut |_| {},
        &AtomicBool::new(true),
    ) {
        Err(DataError::Hub(e)) => assert!(matches!(*e, HubError::Cancelled { .. }), "{e:?}"),
        other => panic!("{other:?}"),
    }
    match Dataset::open_dataset_name("owner/no-such-set", None, &settings, &options()) {
        Err(e @ DataError::Hub(_)) => {
            let text = e.to_string();
            assert!(
                text.contains("owner/no-such-set") && text.contains("not found"),
                "{text}"
            );
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_hub_dataset_without_training_data_is_refused_before_any_download() {
    use common::fake_hub::{FakeHub, FakeRepo};
    let sha = "5555555555555555555555555555555555555555";
    let mut only_test = hub_dataset(sha);
    only_test.files.retain(|name, _| !name.contains("train-"));
    let mut no_data =
        FakeRepo::from_folder("datasets/owner/notes", sha, &fixtures().join("parquet"));
    no_data.files.clear();
    no_data
        .files
        .insert("README.md".into(), b"# notes\n".to_vec());
    let hub = FakeHub::start(vec![only_test, no_data]);
    let cache = tempfile::tempdir().unwrap();
    let settings = hub.settings(cache.path());
    for (id, expected) in [
        ("owner/tiny-edits", "none is the train split"),
        (
            "owner/notes",
            "no .parquet files, no metadata.jsonl and no images",
        ),
    ] {
        match Dataset::open_dataset_name(id, None, &settings, &options()) {
            Err(e @ DataError::Hub(_)) => {
                let text = e.to_string();
                assert!(text.contains(id) && text.contains(expected), "{text}");
            }
            other => panic!("{id}: {other:?}"),
        }
    }
    assert!(
        hub.resolved_files().is_empty(),
        "{:?}",
        hub.resolved_files()
    );
}

#[test]
fn max_train_samples_takes_the_first_n_of_a_seeded_shuffle() {
    let dir = fixtures().join("parquet");
    let full = Dataset::open_parquet_folder(&dir, &options()).unwrap();
    let take = |seed: u64| {
        let opts = DatasetOptions {
            max_train_samples: Some(3),
            seed,
            ..options()
        };
        let dataset = Dataset::open_parquet_folder(&dir, &opts).unwrap();
        (0..dataset.len())
            .map(|i| dataset.name(i).unwrap())
            .collect::<Vec<_>>()
    };
    let order = shuffled_indices(6, 42);
    let expected: Vec<String> = order[..3].iter().map(|&i| full.name(i).unwrap()).collect();
    assert_eq!(take(42), expected);
    assert_eq!(take(42), take(42));
    assert_ne!(take(42), take(7));
    // More than the dataset: all of it, shuffled.
    let opts = DatasetOptions {
        max_train_samples: Some(100),
        seed: 42,
        ..options()
    };
    assert_eq!(Dataset::open_parquet_folder(&dir, &opts).unwrap().len(), 6);
}

fn fixture_examples(n: usize) -> Vec<Example> {
    EXAMPLES[..n]
        .iter()
        .map(|(name, prompt)| Example {
            original: fixture_image(name),
            edited: fixture_image(&format!("{name}_edited")),
            prompt: prompt.to_string(),
            name: name.to_string(),
        })
        .collect()
}

#[test]
fn preprocessing_equals_the_scripts_tensors() {
    let reference =
        candle_core::safetensors::load(fixtures().join("preprocess.safetensors"), &Device::Cpu)
            .unwrap();
    let examples = fixture_examples(4);
    let flips = [false, true, true, false];
    for resolution in [16u32, 24] {
        let batch = prepare_batch(
            &examples,
            &flips,
            resolution,
            CropMode::Random,
            &Device::Cpu,
        )
        .unwrap();
        let r = resolution as usize;
        assert_eq!(batch.original_pixel_values.dims(), [4, 3, r, r]);
        assert_eq!(
            batch.prompts,
            [
                "make it blue",
                "invert the colors",
                "add clouds",
                "turn it into night"
            ]
        );
        for (ours, key) in [
            (&batch.original_pixel_values, "original"),
            (&batch.edited_pixel_values, "edited"),
        ] {
            let expected = &reference[&format!("{key}_{resolution}")];
            let ours = ours.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let expected = expected.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            // Bit-exact: same resize bytes and the same float32 operations as torch.
            let differing = ours
                .iter()
                .zip(&expected)
                .filter(|(a, b)| a.to_bits() != b.to_bits())
                .count();
            assert_eq!(
                differing, 0,
                "{key} at {resolution}: {differing} values differ"
            );
        }
    }
    // Center crop gives the same (the resized image already has the size).
    let center = prepare_batch(&examples, &flips, 16, CropMode::Center, &Device::Cpu).unwrap();
    let random = prepare_batch(&examples, &flips, 16, CropMode::Random, &Device::Cpu).unwrap();
    let values = |t: &candle_core::Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(
        values(&center.original_pixel_values),
        values(&random.original_pixel_values)
    );
}

#[test]
fn flips_mirror_input_and_edited_together() {
    let examples = fixture_examples(2);
    let plain = prepare_batch(
        &examples,
        &[false, false],
        8,
        CropMode::Random,
        &Device::Cpu,
    )
    .unwrap();
    let flipped =
        prepare_batch(&examples, &[true, false], 8, CropMode::Random, &Device::Cpu).unwrap();
    // Example 0 flipped: every row reversed, in both images; example 1 untouched.
    for (p, f) in [
        (&plain.original_pixel_values, &flipped.original_pixel_values),
        (&plain.edited_pixel_values, &flipped.edited_pixel_values),
    ] {
        let mut mirrored = values3(&p.get(0).unwrap());
        for channel in &mut mirrored {
            for row in channel.iter_mut() {
                row.reverse();
            }
        }
        assert_eq!(values3(&f.get(0).unwrap()), mirrored);
        assert_ne!(values3(&f.get(0).unwrap()), values3(&p.get(0).unwrap()));
        assert_eq!(values3(&f.get(1).unwrap()), values3(&p.get(1).unwrap()));
    }
    assert!(matches!(
        prepare_batch(&examples, &[true], 8, CropMode::Random, &Device::Cpu),
        Err(DataError::InvalidSetting(_))
    ));
}

fn values3(t: &candle_core::Tensor) -> Vec<Vec<Vec<f32>>> {
    t.to_vec3::<f32>().unwrap()
}

#[test]
fn sampler_covers_each_epoch_and_resumes_at_the_same_batch() {
    let len = 10;
    let batch_size = 4;
    let mut sampler = EpochSampler::new(len, batch_size, 42, FlipMode::PerBatch).unwrap();
    assert_eq!(sampler.batches_per_epoch(), 3);
    let batches: Vec<_> = sampler.by_ref().take(9).collect();
    for epoch in 0..3 {
        let of_epoch = &batches[epoch * 3..epoch * 3 + 3];
        // Sizes 4, 4, 2 (the last batch is kept, as DataLoader's drop_last=False).
        let sizes: Vec<usize> = of_epoch.iter().map(|b| b.indices.len()).collect();
        assert_eq!(sizes, [4, 4, 2]);
        let seen: BTreeSet<usize> = of_epoch.iter().flat_map(|b| b.indices.clone()).collect();
        assert_eq!(seen, (0..len).collect::<BTreeSet<_>>());
        for (i, b) in of_epoch.iter().enumerate() {
            assert_eq!(
                b.position,
                SamplerPosition {
                    epoch: epoch as u64,
                    batch: i
                }
            );
            // One flip draw per batch, as the script.
            assert!(b.flips.iter().all(|&f| f == b.flips[0]));
        }
    }
    let epoch_orders: Vec<Vec<usize>> = (0..3)
        .map(|e| {
            batches[e * 3..e * 3 + 3]
                .iter()
                .flat_map(|b| b.indices.clone())
                .collect()
        })
        .collect();
    assert_ne!(
        epoch_orders[0], epoch_orders[1],
        "each epoch is shuffled anew"
    );
    let all_flips: BTreeSet<bool> = batches.iter().map(|b| b.flips[0]).collect();
    assert_eq!(all_flips.len(), 2, "both flip outcomes occur in 9 batches");

    // Save the position after batch 5 (through JSON, as a checkpoint would), restart, compare.
    let mut first = EpochSampler::new(len, batch_size, 42, FlipMode::PerBatch).unwrap();
    for _ in 0..5 {
        first.next_batch();
    }
    let saved = serde_json::to_string(&first.position()).unwrap();
    let position: SamplerPosition = serde_json::from_str(&saved).unwrap();
    assert_eq!(position, SamplerPosition { epoch: 1, batch: 2 });
    let mut resumed =
        EpochSampler::resume(len, batch_size, 42, FlipMode::PerBatch, position).unwrap();
    for expected in &batches[5..9] {
        assert_eq!(&resumed.next_batch(), expected);
    }
    // Resuming at the end of an epoch (batch == batches_per_epoch) continues with the next one.
    let mut at_end = EpochSampler::resume(
        len,
        batch_size,
        42,
        FlipMode::PerBatch,
        SamplerPosition { epoch: 0, batch: 3 },
    )
    .unwrap();
    assert_eq!(at_end.next_batch(), batches[3]);

    // Another seed, another order; flip modes.
    let other: Vec<_> = EpochSampler::new(len, batch_size, 7, FlipMode::Never)
        .unwrap()
        .take(3)
        .collect();
    assert_ne!(
        other
            .iter()
            .flat_map(|b| b.indices.clone())
            .collect::<Vec<_>>(),
        epoch_orders[0]
    );
    assert!(other.iter().all(|b| b.flips.iter().all(|&f| !f)));
    let per_example: Vec<bool> = EpochSampler::new(len, len, 42, FlipMode::PerExample)
        .unwrap()
        .take(4)
        .flat_map(|b| b.flips)
        .collect();
    assert!(per_example.contains(&true) && per_example.contains(&false));

    assert!(EpochSampler::new(0, 4, 1, FlipMode::Never).is_err());
    assert!(EpochSampler::new(4, 0, 1, FlipMode::Never).is_err());
    assert!(
        EpochSampler::resume(
            10,
            4,
            1,
            FlipMode::Never,
            SamplerPosition { epoch: 0, batch: 4 }
        )
        .is_err()
    );
}
