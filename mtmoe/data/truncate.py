"""Fitting an encoded conversation to `max_len`: the `--overflow` policies, answer first.

A conversation is encoded turn by turn (`mtmoe.data.encode.encode_turns`). When it is longer than
`max_len`, the policies `truncate` and `truncate-middle` shorten the prompt and keep the answer, the
final assistant turn(s) after the last user turn:

1. Turns after the last assistant turn are removed (they carry no loss).
2. The prompt is shortened. A leading system turn is kept. `truncate` drops whole rounds of the history
   (a user turn and the turns after it, up to the next user turn), oldest first, until the last user turn
   fits whole, and only then cuts the middle of the last user turn. `truncate-middle` cuts the middle of
   the last user turn first (down to `PROMPT_FLOOR` tokens: its first and last halves are kept, so the
   template's header and end marker survive) and drops history rounds only when that is not enough.
3. Only when the answer does not fit beside the system turn and the floor of the last user turn is the
   answer cut, from its end.

`truncate-right` is the policy of manifest version 1 (a plain cut from the right, which may cut the whole
answer away), and `drop` drops every sample that is too long. A sample left without a target token is
dropped. Every cut and drop is counted by its reason (`CUTS`, `DROPS`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

OVERFLOW_POLICIES = ("truncate", "truncate-middle", "truncate-right", "drop")
PROMPT_FLOOR = 32  # tokens the last user turn keeps (its first and last 16) before the answer is cut
# Why a kept sample was cut; a sample may have several reasons.
CUTS = ("cut_trailing_turns", "cut_oldest_turns", "cut_prompt_middle", "cut_answer", "cut_right")
DROPS = ("dropped_too_long", "dropped_no_target")


@dataclass(frozen=True)
class Piece:
    """The tokens of one chat turn, as the template renders it in context, with its loss mask."""

    role: str
    ids: list[int]
    mask: list[int]


@dataclass(frozen=True, kw_only=True)
class Fit:
    """A conversation fitted to `max_len`.

    Attributes:
        ids: The kept token ids (empty when dropped).
        mask: Their loss mask.
        reasons: The cuts made (`CUTS`), or the one drop (`DROPS`); empty when the sample fit as it was.
        first_turn: Index, in the encoded turns, of the first assistant turn kept (the one a held-out
            prompt is answered by); -1 when dropped.
    """

    ids: list[int]
    mask: list[int]
    reasons: tuple[str, ...]
    first_turn: int

    @property
    def dropped(self) -> bool:
        """Whether the sample was dropped."""
        return bool(self.reasons) and self.reasons[0] in DROPS


def _rounds(history: list[int], pieces: Sequence[Piece]) -> list[list[int]]:
    """Groups turn indices into rounds, each starting at a user turn."""
    rounds: list[list[int]] = []
    for i in history:
        if pieces[i].role == "user" or not rounds:
            rounds.append([])
        rounds[-1].append(i)
    return rounds


def _middle(piece: Piece, keep: int) -> tuple[list[int], list[int]]:
    """The piece's first `ceil(keep / 2)` and last `floor(keep / 2)` tokens."""
    if keep >= len(piece.ids):
        return piece.ids, piece.mask
    head, tail = (keep + 1) // 2, keep // 2
    cut = slice(head, len(piece.ids) - tail)
    return piece.ids[: cut.start] + piece.ids[cut.stop :], piece.mask[: cut.start] + piece.mask[cut.stop :]


def _result(ids: list[int], mask: list[int], reasons: list[str], first_turn: int) -> Fit:
    if not any(mask):
        return Fit(ids=[], mask=[], reasons=("dropped_no_target",), first_turn=-1)
    return Fit(ids=ids, mask=mask, reasons=tuple(reasons), first_turn=first_turn)


def _first_assistant(kept: Sequence[int], pieces: Sequence[Piece]) -> int:
    return next((i for i in kept if pieces[i].role == "assistant" and any(pieces[i].mask)), -1)


def _keep_answer(pieces: Sequence[Piece], max_len: int, middle_first: bool, bos_id: int | None) -> Fit:
    reasons: list[str] = []
    answer = max(i for i, p in enumerate(pieces) if p.role == "assistant")
    if answer + 1 < len(pieces):
        reasons.append("cut_trailing_turns")
    question = max((i for i in range(answer) if pieces[i].role == "user"), default=-1)
    assert question >= 0, "a conversation opens with a user turn"  # `parse_record` checks it
    head = [0] if pieces[0].role == "system" else []
    tail = list(range(question + 1, answer + 1))
    size = lambda indices: sum(len(pieces[i].ids) for i in indices)  # noqa: E731
    room = max_len - size(head) - size(tail)  # for the history and the last user turn
    rounds = _rounds(list(range(len(head), question)), pieces)
    q_len = len(pieces[question].ids)
    floor = min(q_len, PROMPT_FLOOR)
    need = floor if middle_first else q_len
    while rounds and sum(size(r) for r in rounds) + need > room:
        rounds.pop(0)
        if "cut_oldest_turns" not in reasons:
            reasons.append("cut_oldest_turns")
    history = [i for r in rounds for i in r]
    q_keep = min(q_len, max(room - size(history), floor))
    if q_keep < q_len:
        reasons.append("cut_prompt_middle")
    ids: list[int] = []
    mask: list[int] = []
    for i in head + history:
        ids += pieces[i].ids
        mask += pieces[i].mask
    q_ids, q_mask = _middle(pieces[question], q_keep)
    ids += q_ids
    mask += q_mask
    for i in tail:
        ids += pieces[i].ids
        mask += pieces[i].mask
    if len(ids) > max_len:
        reasons.append("cut_answer")
        ids, mask = ids[:max_len], mask[:max_len]
    if bos_id is not None and pieces[0].ids[:1] == [bos_id] and ids[:1] != [bos_id] and len(ids) < max_len:
        ids, mask = [bos_id, *ids], [0, *mask]  # dropping the first round must not drop the template's BOS
    return _result(ids, mask, reasons, _first_assistant(head + history + tail, pieces))


def fit_pieces(pieces: Sequence[Piece], max_len: int, overflow: str, bos_id: int | None = None) -> Fit:
    """Fits an encoded conversation to `max_len` tokens by the `overflow` policy (see the module doc).

    Args:
        pieces: The conversation's turns, as `encode_turns` returns them.
        max_len: Longest sample, in tokens.
        overflow: One of `OVERFLOW_POLICIES`.
        bos_id: The tokenizer's BOS id, kept at the front when the first round is dropped.

    Returns:
        The fitted sample, with the reasons for each cut, or the reason it was dropped.
    """
    ids = [t for p in pieces for t in p.ids]
    mask = [m for p in pieces for m in p.mask]
    first = _first_assistant(range(len(pieces)), pieces)
    if len(ids) <= max_len:
        return _result(ids, mask, [], first)
    if overflow == "drop":
        return Fit(ids=[], mask=[], reasons=("dropped_too_long",), first_turn=-1)
    if overflow == "truncate-right":
        return _result(ids[:max_len], mask[:max_len], ["cut_right"], first)
    return _keep_answer(pieces, max_len, overflow == "truncate-middle", bos_id)
