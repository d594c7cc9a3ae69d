"""Preference data: sources -> validated rows -> tokenized pairs in a memory-mapped token cache.

sources.py     files, folders, `save_to_disk` folders, hub datasets; rows read in chunks
rows.py        forms, validation, implicit prompts, column names
tokenize.py    batched tokenization (as TRL 1.16) and truncation, into flat arrays
store.py       Pair / Sequence views over those arrays; PreferenceData
token_cache.py tokenize once (ranks share the chunks), open memory-mapped everywhere
batching.py    pairs -> micro-batches: step plans, rank shares, padded / packed / shared layouts and masks
"""

from dpo_dist.data.sources import resolve_files, resolve_sources
from dpo_dist.data.store import Pair, Pairs, PreferenceData, Sequence
from dpo_dist.data.token_cache import load_preference_data, prepare_split

__all__ = ["Pair", "Pairs", "PreferenceData", "Sequence", "load_preference_data", "prepare_split", "resolve_files",
           "resolve_sources"]
