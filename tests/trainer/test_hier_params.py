"""One parameter base class for GRU4Rec, HRNN and p-RNN: shared fields and defaults, one
validation path, ``key=value`` parsing for every model, the HRNN paper preset."""

from __future__ import annotations

from dataclasses import fields

import pytest

from trainer.hier import HierParams, HRNNParams, PRNNParams, parse_hier_params
from trainer.presets import BaseParams, ParamError, TrainParams, make_params

SHARED = [
    "loss",
    "batch_size",
    "n_epochs",
    "learning_rate",
    "momentum",
    "n_sample",
    "sample_alpha",
    "bpreg",
    "logq",
    "seed",
    "device",
    "elu_param",
    "final_act",
]


def test_every_model_shares_the_base_fields_and_defaults():
    base = {f.name: f.default for f in fields(BaseParams)}
    assert set(SHARED) <= set(base)
    for cls in (TrainParams, HierParams, HRNNParams, PRNNParams):
        assert issubclass(cls, BaseParams)
        p = cls()
        for k in SHARED:
            assert getattr(p, k) == base[k], (cls.__name__, k)
    # HRNN and GRU4Rec at their defaults differ only by the user path
    g, h = TrainParams(), HRNNParams()
    for k in ("layers", "embedding", "constrained_embedding", "dropout_p_embed",
              "session_memory", "memory_gate", "memory_holdout"):  # fmt: skip
        assert getattr(g, k) == getattr(h, k), k
    assert g.resolved_final_act() == h.resolved_final_act()


@pytest.mark.parametrize("cls", [TrainParams, HRNNParams, PRNNParams])
@pytest.mark.parametrize(
    ("bad", "name"),
    [
        ("loss=hinge", "loss"),
        ("dropout_p_hidden=1.5", "dropout_p_hidden"),
        ("n_sample=-1", "n_sample"),
        ("learning_rate=0", "learning_rate"),
        ("batch_size=0", "batch_size"),
        ("final_act=relu", "final_act"),
        ("n_epochs=1.5", "n_epochs"),
        ("nope=1", "nope"),
    ],
)
def test_one_validation_path(cls, bad, name):
    with pytest.raises(ParamError, match=name):
        cls.make(None, [bad])


def test_model_specific_fields_and_choices():
    h = parse_hier_params(["layers=64/32", "user_layers=16", "user_to_output=1"], HRNNParams)
    assert (h.layers, h.user_layers, h.user_to_output) == ([64, 32], [16], True)
    p = parse_hier_params(["arch=id", "subnet_weights=1,0.5", "text_columns=a/b"], PRNNParams)
    assert (p.arch, p.subnet_weights, p.text_columns) == ("id", [1.0, 0.5], ["a", "b"])
    with pytest.raises(ParamError, match="arch"):
        parse_hier_params(["arch=tree"], PRNNParams)
    with pytest.raises(ParamError, match="user_layers"):
        make_params(None, ["user_layers=10"])  # not a GRU4Rec parameter
    with pytest.raises(ParamError, match="schedule"):
        HierParams(schedule="random")


def test_bpr_max_gets_elu_for_every_model():
    for cls in (TrainParams, HRNNParams, PRNNParams):
        assert cls.make(None, ["loss=bpr-max"]).resolved_final_act() == "elu"
        assert cls.make(None, ["loss=bpr-max", "elu_param=0"]).resolved_final_act() == "linear"
    assert HRNNParams.make(None, ["loss=bpr-max"]).model_options()["final_act"] == "elu"


def test_presets():
    paper = HRNNParams.make("hrnn_paper_small")
    assert (paper.loss, paper.learning_rate, paper.batch_size, paper.n_epochs) == (
        "top1", 0.1, 50, 10,
    )  # fmt: skip
    assert paper.dropout_p_hidden == 0.1 and paper.n_sample == 0 and paper.final_act == "tanh"
    # GRU4Rec presets give HRNN / p-RNN their shared training keys
    y = HRNNParams.make("yoochoose_xe_shared_best", ["n_epochs=2"])
    assert (y.batch_size, y.learning_rate, y.logq, y.n_epochs) == (48, 0.07, 1.0, 2)
    assert PRNNParams.make("yoochoose_xe_shared_best").batch_size == 48
    with pytest.raises(ParamError, match="hrnn_paper_small"):
        make_params("hrnn_paper_small")  # an HRNN preset, unknown to GRU4Rec
