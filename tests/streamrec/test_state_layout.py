"""The error for state of an older layout says what the layout is and what to do."""

from __future__ import annotations

from streamrec.serving.state import STATE_LAYOUT, layout_refused


def test_a_refused_layout_says_where_what_and_what_to_do() -> None:
    assert str(layout_refused("partition 3's store", "1")) == (
        f"partition 3's store holds state of layout 1; this streamrec writes layout "
        f"{STATE_LAYOUT} (users under u:<user id>, anonymous sessions under a:<session id>) "
        "and does not read older layouts. Start from empty state: delete the state directory "
        "and the changelog topic, or use a new worker.app_id (open sessions restart; user "
        "histories are lost)."
    )
