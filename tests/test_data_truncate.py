"""Truncation keeps the answer: the prompt is cut (oldest rounds first, or the middle of the last user turn
first), the answer only when it alone is over the budget; every cut and drop is counted by its reason."""

import json

import pytest

from mtmoe.data.build import tokenize_tasks
from mtmoe.data.shards import open_shard
from mtmoe.data.truncate import PROMPT_FLOOR, Piece, fit_pieces
from mtmoe.model.base import ensure_smollm2, load_tokenizer


def piece(role, n, start, loss=False):
    """A turn of n tokens numbered from `start`; an assistant turn has a 2-token header without loss."""
    ids = list(range(start, start + n))
    mask = [0, 0] + [1] * (n - 2) if loss else [0] * n
    return Piece(role, ids, mask)


def chat(*sizes_roles):
    pieces, start = [], 0
    for role, n in sizes_roles:
        pieces.append(piece(role, n, start, loss=role == "assistant"))
        start += 1000
    return pieces


def test_a_sample_that_fits_is_kept_whole():
    pieces = chat(("user", 10), ("assistant", 5))
    fit = fit_pieces(pieces, 15, "truncate")
    assert fit.ids == pieces[0].ids + pieces[1].ids and fit.reasons == () and fit.first_turn == 1


def test_oldest_rounds_go_first_then_the_middle_of_the_last_user_turn():
    turns = [("system", 5), ("user", 20), ("assistant", 10), ("user", 20), ("assistant", 10), ("user", 40)]
    pieces = chat(*turns, ("assistant", 6))
    fit = fit_pieces(pieces, 5 + 20 + 10 + 40 + 6, "truncate")  # room for one old round
    assert fit.reasons == ("cut_oldest_turns",)
    assert fit.ids == pieces[0].ids + pieces[3].ids + pieces[4].ids + pieces[5].ids + pieces[6].ids
    assert fit.first_turn == 4  # the first assistant turn kept: what a held-out prompt leads to
    fit = fit_pieces(pieces, 5 + 36 + 6, "truncate")  # no old round fits, and the last question is cut
    assert fit.reasons == ("cut_oldest_turns", "cut_prompt_middle")
    question = pieces[5].ids
    assert fit.ids == pieces[0].ids + question[:18] + question[-18:] + pieces[6].ids
    assert fit.mask == [0] * (5 + 36) + pieces[6].mask


def test_truncate_middle_keeps_the_history_while_the_question_can_shrink():
    pieces = chat(("user", 20), ("assistant", 10), ("user", 100), ("assistant", 6))
    fit = fit_pieces(pieces, 30 + 50 + 6, "truncate-middle")
    assert fit.reasons == ("cut_prompt_middle",)
    assert fit.ids[:30] == pieces[0].ids + pieces[1].ids and len(fit.ids) == 86
    fit = fit_pieces(pieces, 30 + 50 + 6, "truncate")
    assert fit.reasons == ("cut_oldest_turns", "cut_prompt_middle")  # the history goes first, then the middle
    assert fit.ids == pieces[2].ids[:40] + pieces[2].ids[-40:] + pieces[3].ids
    fit = fit_pieces(pieces, 30 + PROMPT_FLOOR - 1 + 6, "truncate-middle")  # the floor does not fit beside it
    assert fit.reasons == ("cut_oldest_turns", "cut_prompt_middle")
    assert fit.ids == pieces[2].ids[:31] + pieces[2].ids[-30:] + pieces[3].ids  # the room freed is used


def test_the_answer_is_cut_only_when_it_alone_is_over_the_budget():
    pieces = chat(("user", 100), ("assistant", 200))
    fit = fit_pieces(pieces, 150, "truncate")
    assert fit.reasons == ("cut_prompt_middle", "cut_answer")
    assert fit.ids[:PROMPT_FLOOR] == pieces[0].ids[:16] + pieces[0].ids[-16:]
    assert len(fit.ids) == 150 and sum(fit.mask) == 150 - PROMPT_FLOOR - 2
    tiny = fit_pieces(chat(("user", 10), ("assistant", 5)), 11, "truncate")
    assert tiny.reasons == ("dropped_no_target",) and tiny.ids == [] and tiny.dropped


def test_turns_after_the_answer_go_first_and_the_other_policies():
    pieces = chat(("user", 10), ("assistant", 10), ("user", 30))
    fit = fit_pieces(pieces, 25, "truncate")
    assert fit.reasons == ("cut_trailing_turns",) and fit.ids == pieces[0].ids + pieces[1].ids
    right = fit_pieces(chat(("user", 30), ("assistant", 5)), 20, "truncate-right")
    assert right.reasons == ("dropped_no_target",)
    right = fit_pieces(chat(("user", 10), ("assistant", 20)), 20, "truncate-right")
    assert right.reasons == ("cut_right",) and len(right.ids) == 20
    assert fit_pieces(chat(("user", 10), ("assistant", 20)), 20, "drop").reasons == ("dropped_too_long",)


def test_the_template_bos_survives_a_dropped_first_round():
    pieces = chat(("user", 20), ("assistant", 10), ("user", 10), ("assistant", 10))
    pieces[0] = Piece("user", [7, *pieces[0].ids[1:]], pieces[0].mask)
    fit = fit_pieces(pieces, 25, "truncate", bos_id=7)
    assert fit.ids[0] == 7 and fit.ids[1:] == pieces[2].ids + pieces[3].ids


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(ensure_smollm2())


def test_every_answer_of_a_long_prompt_task_is_kept_and_counted(tok, tmp_path):
    """Like multilingual MMLU at a short max_len: long questions, one-letter answers."""
    records = []
    for i in range(40):
        context = " ".join(f"fact{i}_{j}" for j in range(60 + 5 * (i % 7)))
        question = f"Question {i}: {context}\nA. red\nB. blue\nC. green\nD. black\nAnswer:"
        records.append({"question": question, "answer": "ABCD"[i % 4]})
    path = tmp_path / "mmlu.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    for overflow in ("truncate", "truncate-middle"):
        manifest = tokenize_tasks({"mmlu": path}, tok, "tok", 96, overflow, 0.25, None, tmp_path / overflow,
                                  log=lambda _: None)  # fmt: skip
        answers = []
        for split in ("train", "eval"):
            counts = manifest.task("mmlu").splits[split]
            assert (
                counts["samples"] == counts["records"] == counts["cut_prompt_middle"] == counts["truncated"]
            )
            assert counts["dropped_no_target"] == counts["cut_answer"] == 0
            shard = open_shard(manifest, "mmlu", split)
            for i in range(len(shard)):
                ids, mask = shard[i]
                assert len(ids) == 96
                answers.append(tok.decode(ids[mask.astype(bool)]))
                assert (
                    tok.decode(ids)
                    .rstrip()
                    .endswith("Answer:<|im_end|>\n<|im_start|>assistant\n" + answers[-1])
                )
        assert sorted(answers) == sorted(r["answer"] + "<|im_end|>" for r in records)
    old = tokenize_tasks({"mmlu": path}, tok, "tok", 96, "truncate-right", 0.0, None, tmp_path / "right",
                         log=lambda _: None)  # fmt: skip
    assert old.task("mmlu").splits["train"]["dropped_no_target"] == 40  # what issue #20 reported
