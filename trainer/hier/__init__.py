"""Training and per-user evaluation of the user-aware models: HRNN and p-RNN.

Modules, in the order a training run uses them:

- ``params``: ``HierParams`` (the shared ``BaseParams`` plus the loop's options), ``HRNNParams``,
  ``PRNNParams``.
- ``batches``: the two batchings as ``[T, B]`` index arrays (order and slot schedule from
  ``trainer.batching``, the one copy GRU4Rec's trainer uses too).
- ``schedules``: which parameter groups train in which epoch (joint, staged, by subnet).
- ``chain``: how each session's user state is made from the user's previous session.
- ``loop``: ``train_hier``, the training loop.
- ``memory``: the session memory's held-out sessions and the fit of its offsets on them.
- ``evaluate``: per-user evaluation, POP in the step API.
- ``jobs``: ``trainer train --model hrnn|prnn``.

Two batchings (``HierParams.batching``):

``session`` (HRNN's default): GRU4Rec's session-parallel mini-batches in time order (sessions
by first event), so training sees the log as GRU4Rec does and its last updates are about the
latest sessions (the test sessions are each user's latest). A session starts from its user's
state made from the user's previous session (``UserChain``: the user state that session started
from and its final state, stored when it ends; the user GRU is applied, with gradient, at the
first step of the next session, so it learns from that session's first prediction, as in the
authors' code). By default (``wait_for_user=False``) the schedule is exactly GRU4Rec's: a
session whose predecessor still runs in another slot starts from the pair stored in the
previous epoch (complete in content, one epoch old in weights). ``wait_for_user=True`` instead
schedules a user's next session only after the previous one has ended, which pushes heavy
users' sessions towards the end of the epoch (measured in bench/results/hrnn-time-ordered.md).
Every event is an input (the last one of a session with no target), so the state handed to
``end_session`` is the state after the whole session, as in the live service.
User-parallel batches spend the end of every epoch on the few users with the longest histories
(on a 228-user MovieLens-1M sample the last 20 % of the steps had at most 7 live slots).

HRNN's default schedule is ``residual`` (staged): its session network (GRU4Rec's) trains alone
for ``n_epochs`` with the user path off, exactly as ``train_gru4rec``; then the user path (user
GRU, ``W_init``, the item memory's offset, in ``all`` the user columns of the first layer) trains
for ``n_epochs`` on top of it, frozen. The user path can then only add to GRU4Rec what it learns
(bench/results/hrnn-staged-memory.md); ``joint`` trains everything at once, as the paper.

``user`` (p-RNN's default) -- user-parallel mini-batches: each of the B slots follows one user
through all of their sessions in time order. At the first event of a session the slot's user state
is advanced with the previous session's final state (``end_session``) and the session state
re-initialised from it (``initial_state``); at the first event of a new user both are reset (empty
user state, then the initialisation from it). Every event of a session is an input (the last one
with no target), so the state handed to ``end_session`` is the state after the whole session, as
in the live service. Truncated BPTT of one step, as GRU4Rec: states are detached after every step;
the user GRU and ``W_init`` get their gradient from the first prediction of the new session (and,
in the ``all`` variant / with ``user_to_output``, from every prediction that reads the user
state).

p-RNN trains on the same batches (its user state is empty; its session state resets at every
session start) with one of four schedules over its subnets (``trainer.hier.schedules``).

The models are typed by their declared contract, ``streamrec.model.api.TrainableStepModel``
(``TrainableModule``): nothing here probes a model for attributes.
"""

from trainer.hier.batches import (
    SessionParallelBatches,
    UserParallelBatches,
    advance_at_boundaries,
    session_parallel_batches,
    user_parallel_batches,
)
from trainer.hier.evaluate import PopStepModel, evaluate_users, evaluate_users_job, split_stats
from trainer.hier.jobs import train_hrnn_job, train_prnn_job
from trainer.hier.loop import train_hier
from trainer.hier.params import SCHEDULES, HierParams, HRNNParams, PRNNParams, parse_hier_params
from trainer.hier.schedules import Stage, schedule_plan

__all__ = [
    "SCHEDULES",
    "HRNNParams",
    "HierParams",
    "PRNNParams",
    "PopStepModel",
    "SessionParallelBatches",
    "Stage",
    "UserParallelBatches",
    "advance_at_boundaries",
    "evaluate_users",
    "evaluate_users_job",
    "parse_hier_params",
    "schedule_plan",
    "session_parallel_batches",
    "split_stats",
    "train_hier",
    "train_hrnn_job",
    "train_prnn_job",
    "user_parallel_batches",
]
