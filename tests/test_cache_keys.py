"""The runner's record of which manifest each cache key produced (`<stage>/.keys/`), read by a rerun
that runs without Prefect: the same answers Prefect's result store gives."""

import dataclasses

from flows.runner import StageCall, recall, remember
from stages.runtime.manifest import MANIFEST, Manifest
from stages.settings.recipe import SftConfig


def call(tmp_path, seed: int) -> StageCall:
    return StageCall("sft", (SftConfig(seed=seed),), {}, {"demonstrations": "d" * 64}, {}, str(tmp_path))


def publish(tmp_path, c: StageCall, run_id: str) -> Manifest:
    """A stage's output folder, named by its content: a second key with the same output keeps the first
    key's folder and manifest.json, as `manifest.publish` does."""
    folder = tmp_path / "sft" / "abcd"
    manifest = Manifest("sft", str(folder), "ab" * 32, key=c.key(), run_id=run_id, metrics={"sft/loss": 1.5})
    if not folder.exists():
        folder.mkdir(parents=True)
        (folder / MANIFEST).write_text(manifest.to_json())
    return manifest


def test_a_key_is_recalled_with_the_manifest_it_produced(tmp_path):
    first, second = call(tmp_path, 1), call(tmp_path, 2)
    assert first.key() != second.key()
    assert recall(first) is None  # nothing computed yet
    m1 = publish(tmp_path, first, "run-1")
    remember(first, m1)
    assert recall(first) == m1
    assert recall(second) is None  # another key: not cached
    # the second key computes the same content: the folder (and its manifest.json) stays the first's
    m2 = publish(tmp_path, second, "run-2")
    remember(second, m2)
    assert Manifest.load(m2.path).key == first.key()
    assert recall(second) == m2 and recall(first) == m1  # each key its own manifest


def test_a_deleted_folder_or_a_damaged_record_is_not_cached(tmp_path):
    c = call(tmp_path, 1)
    m = publish(tmp_path, c, "run-1")
    remember(c, m)
    (tmp_path / "sft" / ".keys" / c.key()[:32]).write_text("{not json")
    assert recall(c) is None
    remember(c, m)
    remember(c, dataclasses.replace(m))  # the same record again: unchanged, no temporary file left
    assert [p.name for p in (tmp_path / "sft" / ".keys").iterdir()] == [c.key()[:32]]
    (tmp_path / "sft" / "abcd" / MANIFEST).unlink()  # the artifact deleted: recompute, never point at it
    assert recall(c) is None


def test_a_key_follows_the_code_its_stage_imports_and_nothing_else(tmp_path, monkeypatch):
    """The key holds the source of the stage's module and of every `stages` module it imports,
    transitively: an edit three imports deep retrains the stage; an edit to a module it never imports
    does not."""
    import shutil

    import flows
    from flows import runner

    shutil.copytree(flows.ROOT / "stages", tmp_path / "stages", ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(flows, "ROOT", tmp_path)

    def key() -> str:
        runner.code_version.cache_clear()
        runner.stage_imports.cache_clear()
        return call(tmp_path / "art", 1).key()

    before = key()
    with open(tmp_path / "stages" / "rl" / "ppo_math.py", "a") as f:  # PPO's math: SFT never imports it
        f.write("\n# an edit\n")
    assert key() == before
    with open(tmp_path / "stages" / "runtime" / "rules.py", "a") as f:  # sft -> settings.recipe -> runtime.rules
        f.write("\n# an edit\n")
    assert key() != before
    runner.code_version.cache_clear()
    runner.stage_imports.cache_clear()
