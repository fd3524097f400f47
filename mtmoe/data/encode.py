r"""Chat messages to token ids and an assistant-only loss mask, through the tokenizer's chat template.

The template is rendered once per prefix of the conversation. Each rendering must extend the previous
one (the template is prefix-stable); the new piece of text is tokenized on its own. For an assistant
turn, the piece is split where the generation prompt ends: the header (`<|im_start|>assistant\n` in
ChatML) carries no loss, the content and its end-of-turn marker carry loss, and anything the template
writes after the last special token of the turn (ChatML's trailing newline) carries none again.

Tokenizing pieces apart matches inference: generation starts right after the generation prompt, so
the model never sees the header's last characters merged with the first characters of the answer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mtmoe.data.formats import Message
from mtmoe.data.truncate import Piece


def _render(tokenizer: Any, messages: Sequence[Message], *, generation_prompt: bool = False) -> str:
    if not messages:
        return ""
    conversation = [{"role": m.role, "content": m.content} for m in messages]
    try:
        text = tokenizer.apply_chat_template(
            conversation, tokenize=False, add_generation_prompt=generation_prompt
        )
    except Exception as e:  # jinja2 raises its own TemplateError, and templates raise what they like
        raise ValueError(f"the chat template failed on {len(messages)} messages: {e}") from e
    if not isinstance(text, str):
        raise ValueError(f"the chat template rendered a {type(text).__name__}, not text")
    return text


def _extends(longer: str, shorter: str, what: str) -> str:
    if not longer.startswith(shorter):
        raise ValueError(
            f"the chat template is not prefix-stable: {what} does not extend the shorter rendering, "
            "so turns cannot be tokenized one at a time"
        )
    return longer[len(shorter) :]


def _tokens(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Each text's token ids, in one call of the tokenizer (an empty text has none)."""
    filled = [text for text in texts if text]
    encoded = iter(tokenizer(filled, add_special_tokens=False)["input_ids"] if filled else [])
    return [list(next(encoded)) if text else [] for text in texts]


def end_marker_ids(tokenizer: Any) -> frozenset[int]:
    """The special token ids that may close an assistant turn (eos, `<|im_end|>`, `<|eot_id|>`...)."""
    ids = set(tokenizer.all_special_ids)
    ids.update(i for i, token in tokenizer.added_tokens_decoder.items() if token.special)
    return frozenset(ids)


def encode_turns(
    tokenizer: Any, messages: Sequence[Message], end_ids: frozenset[int] | None = None
) -> list[Piece]:
    """Tokenizes a conversation with the tokenizer's chat template, one piece per turn.

    Args:
        tokenizer: A Hugging Face tokenizer with a chat template.
        messages: The conversation, as returned by `mtmoe.data.formats.parse_record`.
        end_ids: `end_marker_ids(tokenizer)`, for a caller that encodes many conversations.

    Returns:
        One `Piece` per message: the tokens the template renders for it in context, and their loss mask.
        `mask[i]` is 1 when token `i` is a prediction target: the content of an assistant turn and its
        end-of-turn marker. System and user text, the role headers and the template's text around them
        are 0.

    Raises:
        ValueError: If the tokenizer has no chat template, the template fails or is not prefix-stable.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template")
    end_ids = end_marker_ids(tokenizer) if end_ids is None else end_ids
    texts: list[str] = []  # per turn: its text, or an assistant turn's header and body
    previous = ""
    for i, message in enumerate(messages):
        rendered = _render(tokenizer, messages[: i + 1])
        if message.role == "assistant":
            if i == 0:
                raise ValueError("a conversation cannot open with an assistant turn")
            header = _render(tokenizer, messages[:i], generation_prompt=True)
            texts.append(_extends(header, previous, f"the generation prompt after turn {i}"))
            texts.append(_extends(rendered, header, f"assistant turn {i}"))
        else:
            texts.append(_extends(rendered, previous, f"turn {i}"))
        previous = rendered
    ids = iter(_tokens(tokenizer, texts))
    pieces: list[Piece] = []
    for message in messages:
        if message.role == "assistant":
            head_ids, body_ids = next(ids), next(ids)
            ends = [j for j, t in enumerate(body_ids) if t in end_ids]
            n_loss = ends[-1] + 1 if ends else len(body_ids)
            mask = [0] * len(head_ids) + [1] * n_loss + [0] * (len(body_ids) - n_loss)
            pieces.append(Piece(message.role, head_ids + body_ids, mask))
        else:
            piece_ids = next(ids)
            pieces.append(Piece(message.role, piece_ids, [0] * len(piece_ids)))
    return pieces


def encode_messages(tokenizer: Any, messages: Sequence[Message]) -> tuple[list[int], list[int]]:
    """Tokenizes a conversation with the tokenizer's chat template and marks the assistant tokens.

    Args:
        tokenizer: A Hugging Face tokenizer with a chat template.
        messages: The conversation, as returned by `mtmoe.data.formats.parse_record`.

    Returns:
        `(input_ids, loss_mask)`, of equal length: `encode_turns`' pieces back to back.

    Raises:
        ValueError: If the tokenizer has no chat template, the template fails or is not prefix-stable.
    """
    pieces = encode_turns(tokenizer, messages)
    return [t for p in pieces for t in p.ids], [m for p in pieces for m in p.mask]
