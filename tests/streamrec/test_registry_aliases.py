"""The registry's aliases: champion (CURRENT, as before) and challenger, promote, rollback,
the log of who changed what and why, and what pruning keeps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from streamrec.loop import registry
from streamrec.model.checkpoint import CheckpointRecord, save_checkpoint
from streamrec.model.gru4rec import GRU4Rec, GRU4RecConfig
from streamrec.serving.served_model import ModelHolder, ServingModel


def _ckpt(path: Path, seed: int) -> CheckpointRecord:
    model = GRU4Rec(GRU4RecConfig(n_items=5, layers=[4]), seed=seed)
    return save_checkpoint(path, model, "gru4rec", [f"i{j}" for j in range(5)])


def _add(models: Path, seed: int) -> str:
    return registry.add_version(models, _ckpt(registry.staging_dir(models, str(seed)), seed))


def test_a_registry_from_before_aliases_reads_the_same(tmp_path: Path) -> None:
    """CURRENT is the champion; no CHALLENGER file: no challenger; no registry log."""
    models = tmp_path / "models"
    v = _add(models, 1)
    (models / "CURRENT").write_text(v + "\n")  # as an older streamrec wrote it
    assert registry.alias_version(models, "champion") == registry.current_version(models) == v
    assert registry.alias_version(models, "challenger") is None
    assert registry.resolve(models, "challenger") is None
    assert registry.resolve(models) == models / "versions" / v
    (info,) = registry.list_versions(models)
    assert info.published and info.aliases == ("champion",)
    assert registry.previous_champion(models) is None and registry.read_alias_log(models) == []
    with pytest.raises(registry.RegistryError, match="unknown alias"):
        registry.alias_version(models, "canary")


def test_challenger_promote_rollback_and_the_log(tmp_path: Path) -> None:
    from trainer.cli import main

    models = tmp_path / "models"
    v1, v2, v3 = (_add(models, s) for s in (1, 2, 3))
    registry.publish(models, v1, by="test")
    run = CliRunner()

    def cli(*args: str) -> str:
        out = run.invoke(main, ["models", *args, "--models", str(models)])
        assert out.exit_code == 0, out.output
        return out.output

    cli("alias", "challenger", v2, "--reason", "try it")
    assert registry.alias_version(models, "challenger") == v2
    assert "[challenger]" in cli("list") and f"* {v1}" in cli("list")
    assert json.loads(cli("show", v2, "--json"))["aliases"] == ["challenger"]
    out = run.invoke(main, ["models", "alias", "--models", str(models), "champion", "--clear"])
    assert out.exit_code != 0 and "cannot be removed" in out.output
    out = run.invoke(main, ["models", "alias", "--models", str(models), "challenger", "nope"])
    assert out.exit_code != 0 and "no version" in out.output
    # a worker's challenger holder follows the CHALLENGER pointer
    holder = ModelHolder(
        ServingModel.from_checkpoint(models / "versions" / v2, "cpu"),
        watch_dir=models,
        alias="challenger",
    )
    registry.set_alias(models, "challenger", v3)
    assert holder.maybe_reload() and holder.current.version == v3
    cli("promote", "--reason", "it won")
    assert registry.current_version(models) == v3
    assert registry.alias_version(models, "challenger") is None
    assert registry.previous_champion(models) == v1
    log = registry.read_alias_log(models)
    assert [(r["event"], r["version"], r["previous"], r["by"]) for r in log] == [
        ("champion", v1, None, "test"),
        ("challenger", v2, None, "alias"),
        ("challenger", v3, v2, "alias"),
        ("champion", v3, v1, "promote"),
    ]
    assert log[1]["reason"] == "try it" and log[-1]["challenger_cleared"]
    out = run.invoke(main, ["models", "promote", "--models", str(models)])
    assert out.exit_code != 0 and "no challenger" in out.output
    cli("rollback", v1, "--reason", "worse live")
    assert registry.current_version(models) == v1
    assert registry.read_alias_log(models)[-1] == {
        **registry.read_alias_log(models)[-1],
        "event": "champion", "version": v1, "previous": v3, "by": "rollback",
        "reason": "worse live",
    }  # fmt: skip
    cli("alias", "challenger", "--clear")
    assert registry.alias_version(models, "challenger") is None


def test_pruning_keeps_the_aliases_and_the_previous_champion(tmp_path: Path) -> None:
    models = tmp_path / "models"
    v = [_add(models, s) for s in range(5)]
    newest = registry.list_versions(models)[-1].version  # (created within one second)
    registry.publish(models, v[0], keep=10)
    registry.set_alias(models, "challenger", v[1])
    registry.publish(models, v[2], keep=1)  # v0 the previous champion, v1 the challenger
    held = {i.version for i in registry.list_versions(models)}
    assert held == {v[0], v[1], v[2], newest}
    registry.set_alias(models, "challenger", None)
    registry.publish(models, v[0], keep=1)  # back to v0: v2 the previous champion
    assert {i.version for i in registry.list_versions(models)} == {v[0], v[2], newest}
