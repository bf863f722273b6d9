"""Output folders users care about: import, export and dlm-prepare never delete or change a byte
of a file dlm did not write. An output that is, holds or lies inside the input is refused;
--overwrite replaces only a folder dlm wrote and names the file that blocks it; a failure half
way leaves the target as it was and no temporary folder behind."""

import json
import os
import pathlib
import shutil

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from dlm.config import ConfigError
from dlm.convert import export_workdir, import_folder, main as convert_main
from dlm.data.prepare import main as prepare_main
from dlm.folders import MARKER, check_target, foreign_file, writing
from hostile import bounded_memory, cli_error, hashes, one_sentence, run_cli

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "pretrained"


@pytest.fixture(autouse=True)
def _memory():
    with bounded_memory():
        yield


def _cli_error(main, argv, capsys) -> str:
    """main(argv) exits with code 2 and prints one 'error: ' line; the sentence."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert e.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert lines[0].endswith(".")
    return lines[0]


def _untouched(tmp_path, before):
    """Every byte of every file that was there is still there, and no temporary folder is left."""
    after = hashes(tmp_path)
    assert {k: after.get(k) for k in before} == before
    assert not [p for p in tmp_path.rglob("*dlm-partial*")] and not [p for p in tmp_path.rglob("*dlm-old*")]


def _foreign(folder: pathlib.Path, **files) -> pathlib.Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text)
    return folder


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """An imported LLaDA workdir (what export reads)."""
    out = tmp_path_factory.mktemp("import") / "work"
    import_folder(FIXTURES / "llada", out)
    return out


# --- import ---------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["out_is_source", "out_is_source_overwrite", "out_holds_source", "out_inside_source"])
def test_import_refuses_an_output_that_is_holds_or_lies_inside_the_source(tmp_path, capsys, case):
    project = _foreign(tmp_path / "project", **{"notes.txt": "my notes"})
    src = project / "hf"
    shutil.copytree(FIXTURES / "llada", src)
    argv = {"out_is_source": ["--from", src, "--out", src],
            "out_is_source_overwrite": ["--from", src, "--out", src, "--overwrite"],
            "out_holds_source": ["--from", src, "--out", project, "--overwrite"],
            "out_inside_source": ["--from", src, "--out", src / "workdir"]}[case]
    before = hashes(tmp_path)
    msg = _cli_error(convert_main, argv, capsys)
    assert {"out_is_source": "is the input", "out_is_source_overwrite": "is the input",
            "out_holds_source": "holds the input", "out_inside_source": "lies inside the input"}[case] in msg
    _untouched(tmp_path, before)


@pytest.mark.parametrize("overwrite", [False, True])
def test_import_into_a_folder_of_foreign_files_changes_nothing(tmp_path, capsys, overwrite):
    out = _foreign(tmp_path / "mine", **{"model.safetensors": "not dlm's", "config.json": "{}", "tokenizer.json": "x"})
    before = hashes(tmp_path)
    msg = _cli_error(convert_main, ["--from", FIXTURES / "llada", "--out", out] + ["--overwrite"] * overwrite, capsys)
    assert ("is not empty" in msg) if not overwrite else ("which dlm did not write" in msg and "'config.json'" in msg)
    _untouched(tmp_path, before)


def test_overwrite_replaces_a_folder_dlm_wrote_and_is_blocked_by_one_added_file(tmp_path, capsys):
    out = tmp_path / "work"
    import_folder(FIXTURES / "llada", out)
    import_folder(FIXTURES / "dream", out, overwrite=True)
    assert json.loads((out / "hf_config.json").read_text()) == json.loads((FIXTURES / "dream" / "config.json").read_text())
    assert foreign_file(out) is None and sorted(p.name for p in tmp_path.iterdir()) == ["work"]
    (out / "pretrained" / "my_eval.txt").write_text("keep me")
    before = hashes(tmp_path)
    msg = _cli_error(convert_main, ["--from", FIXTURES / "llada", "--out", out, "--overwrite"], capsys)
    assert "'pretrained/my_eval.txt'" in msg
    _untouched(tmp_path, before)


def test_import_that_fails_half_way_leaves_the_target_as_it_was(tmp_path, monkeypatch):
    out = tmp_path / "work"
    import_folder(FIXTURES / "llada", out)
    before = hashes(tmp_path)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("dlm.train.checkpoint.save_params", disk_full)
    with pytest.raises(OSError):
        import_folder(FIXTURES / "dream", out, overwrite=True)
    _untouched(tmp_path, before)
    assert hashes(tmp_path) == before


@pytest.mark.parametrize("kind", ["file", "link"])
def test_import_onto_a_file_or_a_link_is_refused(tmp_path, capsys, kind):
    target = _foreign(tmp_path / "elsewhere", **{"a.txt": "a"})
    out = tmp_path / "out"
    if kind == "file":
        out.write_text("a file of mine")
    else:
        out.symlink_to(target)
    before = hashes(tmp_path)
    assert "is not a folder" in _cli_error(convert_main, ["--from", FIXTURES / "llada", "--out", out, "--overwrite"], capsys)
    _untouched(tmp_path, before)


# --- export ---------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["workdir", "inside", "parent"])
def test_export_refuses_the_source_workdir_and_folders_inside_or_around_it(workdir, capsys, where):
    out = {"workdir": workdir, "inside": workdir / "hf", "parent": workdir.parent}[where]
    before = hashes(workdir.parent)
    msg = _cli_error(convert_main, ["--to", "llada", "--from", workdir, "--out", out, "--overwrite"], capsys)
    assert {"workdir": "is the input", "inside": "lies inside", "parent": "holds the input"}[where] in msg
    assert hashes(workdir.parent) == before


@pytest.mark.parametrize("overwrite", [False, True])
def test_export_into_a_folder_of_foreign_files_changes_nothing(workdir, tmp_path, capsys, overwrite):
    out = _foreign(tmp_path / "hf", **{"model-00001-of-00002.safetensors": "theirs", "model.safetensors.index.json": "{}",
                                      "config.json": "{}", "tokenizer.json": "x"})
    before = hashes(tmp_path)
    msg = _cli_error(convert_main, ["--to", "llada", "--from", workdir, "--out", out] + ["--overwrite"] * overwrite, capsys)
    assert "is not empty" in msg if not overwrite else "which dlm did not write" in msg
    _untouched(tmp_path, before)


def test_export_again_needs_overwrite_and_then_holds_only_the_new_files(workdir, tmp_path, capsys):
    out = tmp_path / "hf"
    first = export_workdir(workdir, out, "llada", max_shard_bytes=1 << 14)  # several shards and an index
    assert len(first["files"]) > 1
    assert "is not empty" in one_sentence(lambda: export_workdir(workdir, out, "llada"))
    second = export_workdir(workdir, out, "llada", overwrite=True)
    assert second["files"] == ["model.safetensors"]
    assert not list(out.glob("model-*")) and not (out / "model.safetensors.index.json").exists()
    assert foreign_file(out) is None


# --- prepare --------------------------------------------------------------------------------


def _corpus(folder: pathlib.Path) -> pathlib.Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": f"document {i} " * 40}) + "\n" for i in range(200)))
    return path


def _prepare_argv(root, corpus, out, *overrides, overwrite=False):
    return ["--config", root / "configs/test.yaml", "--out", out, "--workers", "1", "--no-progress", *["--overwrite"] * overwrite,
            "data.source=files", f"data.paths=[{corpus}]", "data.seq_len=32", *overrides]


@pytest.mark.parametrize("where", ["corpus_folder", "corpus_file"])
def test_prepare_refuses_an_output_that_holds_or_is_the_corpus(root, tmp_path, capsys, where):
    corpus = _corpus(tmp_path / "data")
    out = {"corpus_folder": tmp_path / "data", "corpus_file": corpus}[where]
    before = hashes(tmp_path)
    msg = _cli_error(prepare_main, _prepare_argv(root, corpus, out, overwrite=True), capsys)
    assert ("holds the input" if where == "corpus_folder" else "is the input") in msg
    _untouched(tmp_path, before)


@pytest.mark.parametrize("overwrite", [False, True])
def test_prepare_into_a_folder_of_other_shards_changes_nothing(root, tmp_path, capsys, overwrite):
    corpus = _corpus(tmp_path / "data")
    out = _foreign(tmp_path / "shards", **{"train-00000.array_record": "their shard", "tokenizer.json": "{}",
                                          "wiki-00003.array_record": "another"})
    before = hashes(tmp_path)
    msg = _cli_error(prepare_main, _prepare_argv(root, corpus, out, overwrite=overwrite), capsys)
    assert "is not empty" in msg if not overwrite else "which dlm did not write" in msg
    _untouched(tmp_path, before)


def test_prepare_overwrite_replaces_its_own_shards_unless_a_foreign_file_joined_them(root, tmp_path, capsys):
    corpus = _corpus(tmp_path / "data")
    out = tmp_path / "shards"
    prepare_main([str(a) for a in _prepare_argv(root, corpus, out)])
    prepare_main([str(a) for a in _prepare_argv(root, corpus, out, "data.seq_len=16", overwrite=True)])
    assert json.loads((out / "metadata.json").read_text())["seq_len"] == 16
    (out / "README.md").write_text("what these shards are")
    before = hashes(tmp_path)
    msg = _cli_error(prepare_main, _prepare_argv(root, corpus, out, "data.seq_len=64", overwrite=True), capsys)
    assert "'README.md'" in msg
    _untouched(tmp_path, before)


# --- the commands themselves, in processes limited to 4 GiB ----------------------------------


def test_commands_refuse_in_one_line_without_a_traceback(root, workdir, tmp_path):
    corpus = _corpus(tmp_path / "data")
    foreign = _foreign(tmp_path / "theirs", **{"config.json": "{}"})
    before = hashes(tmp_path)
    runs = {"import": ["-m", "dlm.convert", "--from", FIXTURES / "llada", "--out", foreign, "--overwrite"],
            "export": ["-m", "dlm.convert", "--to", "hf", "--from", workdir, "--out", workdir / "hf"],
            "prepare": ["-m", "dlm.data.prepare", *_prepare_argv(root, corpus, tmp_path / "data", overwrite=True)]}
    for name, args in runs.items():
        msg = cli_error(run_cli(args, cwd=root))
        assert ("did not write" if name == "import" else "inside" if name == "export" else "holds the input") in msg, msg
    _untouched(tmp_path, before)


# --- the rule itself, on random folders ------------------------------------------------------

NAMES = st.sampled_from(["a.txt", "model.safetensors", "config.json", "sub/b.bin", "sub/deeper/c", ".hidden", "d/e.json"])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(files=st.sets(NAMES, min_size=1, max_size=5), listed=st.sets(NAMES, max_size=7), marker=st.booleans())
def test_overwrite_proceeds_exactly_when_the_marker_lists_every_file(tmp_path, files, listed, marker):
    case = tmp_path / f"case{len(list(tmp_path.iterdir()))}"
    out = case / "out"
    for name in files:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(name)
    if marker:
        (out / MARKER).write_text(json.dumps({"written_by": "dlm", "files": sorted(listed)}))
    unlisted = sorted(files - (listed if marker else set()))
    before = hashes(case)
    if unlisted:
        msg = one_sentence(lambda: check_target(out, overwrite=True))
        assert repr(unlisted[0]) in msg
        with pytest.raises(ConfigError):
            with writing(out, overwrite=True) as tmp:
                (tmp / "new").write_text("new")
        assert hashes(case) == before
    else:
        with writing(out, overwrite=True) as tmp:
            (tmp / "new").write_text("new")
        assert sorted(os.listdir(out)) == sorted([MARKER, "new"])
    assert sorted(p.name for p in case.iterdir()) == ["out"]
