"""``trainer train --model hrnn|prnn``: a ``TrainJob`` -> a model trained by ``train_hier``."""

from __future__ import annotations

from dataclasses import asdict
from typing import TypeVar

import torch

from streamrec.model.items import build_item_index
from trainer.hier.loop import train_hier
from trainer.hier.params import SCHEDULES, HierParams, HRNNParams, PRNNParams, parse_hier_params
from trainer.jobs import TrainJob, TrainOutcome

_P = TypeVar("_P", bound=HierParams)


def _job_common(job: TrainJob, cls: type[_P], allowed: set[str]) -> _P:
    """The job's parameters as ``cls``; click errors for options or data the model refuses."""
    import click

    bad = [k for k, v in job.options.items() if v not in (None, (), []) and k not in allowed]
    if bad:
        raise click.UsageError(f"this model does not take {', '.join(bad)}")
    try:
        p = parse_hier_params(job.params, cls, job.preset)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--param") from None
    if "UserId" not in job.train_df.columns:
        raise click.UsageError("HRNN/p-RNN training needs a UserId column in --train")
    return p


def train_hrnn_job(job: TrainJob) -> TrainOutcome:
    """``trainer train --model hrnn``: TrainJob -> TrainOutcome (see trainer.models)."""
    from streamrec.model.hrnn import HRNN

    p = _job_common(job, HRNNParams, {"--variant"})
    variant = job.options.get("--variant") or "init"
    if variant not in ("init", "all"):
        import click

        raise click.BadParameter("--variant must be init or all", param_hint="--variant")
    item_ids, index = build_item_index(job.train_df["ItemId"])
    torch.manual_seed(p.seed)
    model = HRNN(len(item_ids), variant=variant, **p.model_options())
    log = (lambda s: print(s, flush=True)) if job.progress else None
    stats = train_hier(model, job.train_df, index, p, log=log)
    return TrainOutcome(model, "hrnn", item_ids, stats, {**asdict(p), "variant": variant})


def train_prnn_job(job: TrainJob) -> TrainOutcome:
    """``trainer train --model prnn``: features from ``--features`` and/or ``--item-meta``."""
    import click

    from streamrec.model.prnn import PRNN
    from trainer.features import build_item_features

    p = _job_common(job, PRNNParams, {"--features", "--item-meta", "--schedule"})
    p.schedule = job.options.get("--schedule") or "joint"
    if p.schedule not in SCHEDULES:
        raise click.BadParameter(f"one of {', '.join(SCHEDULES)}", param_hint="--schedule")
    item_ids, index = build_item_index(job.train_df["ItemId"])
    feats = []
    if p.arch != "id":
        try:
            feats = build_item_features(
                index,
                len(item_ids),
                features_path=job.options.get("--features"),
                item_meta_path=job.options.get("--item-meta"),
                category_columns=p.category_columns,
                text_columns=p.text_columns,
                tfidf_dim=p.tfidf_dim,
                missing_flag=p.missing_flag,
            )
        except (OSError, ValueError) as e:
            raise click.ClickException(f"item features: {e}") from None
    fh = p.feature_hidden
    fh = fh * len(feats) if len(fh) == 1 else fh
    torch.manual_seed(p.seed)
    model = PRNN(
        len(item_ids),
        [f.dim for f in feats],
        arch=p.arch,
        id_hidden=p.id_hidden,
        feature_hidden=fh,
        embedding=p.embedding,
        subnet_weights=p.subnet_weights or None,
        feature_names=[f.name for f in feats],
        dropout_p_embed=p.dropout_p_embed,
        dropout_p_hidden=p.dropout_p_hidden,
        feature_values=[torch.from_numpy(f.values) for f in feats],
        final_act=p.resolved_final_act(),
        elu_param=p.resolved_elu_param(),
        session_memory=p.session_memory,
        memory_gate=p.memory_gate,
    )
    log = (lambda s: print(s, flush=True)) if job.progress else None
    stats = train_hier(model, job.train_df, index, p, log=log)
    stats["feature_coverage"] = {f.name: f.coverage for f in feats}
    return TrainOutcome(model, "prnn", item_ids, stats, asdict(p))
