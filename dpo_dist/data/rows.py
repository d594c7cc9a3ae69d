"""One preference row: its form, its validation (one clear error naming where and what), and the
prompt of rows that hold it implicitly.

Three forms (one per data set):
  text            {"prompt": str, "chosen": str, "rejected": str}
  conversational  prompt/chosen/rejected as lists of {"role", "content"} messages (system messages
                  and multi-turn history in the prompt)
  pretokenized    {"prompt_input_ids": [int], "chosen_input_ids": [int], "rejected_input_ids": [int]}
Text and conversational rows may leave out `prompt` (HH-RLHF style: chosen and rejected hold the
whole dialogue); the prompt is then their longest common prefix, exactly as TRL's `extract_prompt`.
`data.columns` maps these names to a data set's own.
"""

from __future__ import annotations

from typing import Any

from dpo_dist.errors import UserError

FORMS = {
    "text": ("prompt", "chosen", "rejected"),
    "conversational": ("prompt", "chosen", "rejected"),
    "pretokenized": ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids"),
}


def rename_columns(row: Any, columns: dict[str, str]) -> Any:
    """The row with the data set's column names (`data.columns` values) renamed to ours (its keys)."""
    if not columns or not isinstance(row, dict):
        return row
    renamed = dict(row)
    for ours, theirs in columns.items():
        if theirs in renamed:
            renamed[ours] = renamed.pop(theirs)
    return renamed


def detect_form(row: dict[str, Any]) -> str:
    if all(k in row for k in FORMS["pretokenized"]):
        return "pretokenized"
    if isinstance(row.get("prompt"), list) or isinstance(row.get("chosen"), list):
        return "conversational"
    return "text"


def check_row(row: Any, form: str, implicit_prompt: bool, where: str) -> None:
    """Raises a UserError naming the place and the field when a row is not of `form`."""
    if not isinstance(row, dict):
        raise UserError(f"{where}: a row must be a JSON object, got {type(row).__name__}")
    row_form = detect_form(row)
    if row_form != form:
        raise UserError(f"{where}: row is {row_form} but the data set's first row is {form}; use one form per data set")
    needed = FORMS[form][1:] if implicit_prompt else FORMS[form]
    for key in needed:
        if key not in row or row[key] is None:
            raise UserError(f"{where}: missing field '{key}' ({form} rows need {', '.join(needed)})")
        value = row[key]
        if form == "text":
            if not isinstance(value, str):
                raise UserError(f"{where}: field '{key}' must be a string, got {type(value).__name__}")
            if not value:
                raise UserError(f"{where}: field '{key}' is empty")
        elif form == "conversational":
            if not isinstance(value, list) or not value:
                raise UserError(f"{where}: field '{key}' must be a non-empty list of messages")
            for m in value:
                if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                    raise UserError(f"{where}: field '{key}': each message needs string 'role' and 'content'")
        else:
            if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
                raise UserError(f"{where}: field '{key}' must be a list of token ids (integers)")
            if not value and key != "prompt_input_ids":
                raise UserError(f"{where}: field '{key}' is empty")
    if implicit_prompt and "prompt" in row:
        raise UserError(f"{where}: row has a 'prompt' but the data set's first row does not; use one layout")


def extract_prompt(chosen: str | list, rejected: str | list, where: str) -> tuple:
    """(prompt, chosen, rejected) for a row whose prompt is implicit: the longest common prefix of
    chosen and rejected (characters of text, whole messages of a dialogue), as TRL 1.16's
    `extract_prompt` computes it, corner cases included (when one is a prefix of the other, the
    last shared element goes to the responses), so tokens match TRL's. Rows that share no
    beginning have no prompt to extract and are refused (TRL would train on an empty prompt)."""
    if not chosen or not rejected or chosen[0] != rejected[0]:
        raise UserError(f"{where}: chosen and rejected share no beginning, so there is no implicit prompt; "
                        "add a 'prompt' field")
    for idx in range(min(len(chosen), len(rejected))):
        if chosen[idx] != rejected[idx]:
            if chosen[idx - 1] == " ":  # the space before the response stays with it
                idx -= 1
            break
    return chosen[:idx], chosen[idx:], rejected[idx:]
