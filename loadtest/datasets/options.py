"""Every dataset knob in one place (filled from the command line)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass
class DatasetOptions:
    name: str = "random"                 # random | shared-prefix | multi-turn | sharegpt
    num_prompts: int | None = None       # requests per load point; None: the dataset's own
    seed: int = 0
    # random (and the answer length of shared-prefix and multi-turn)
    random_input_len: int = 256
    random_output_len: int = 64
    random_range_ratio: float = 0.0
    # shared-prefix (SGLang's generated-shared-prefix)
    gsp_num_groups: int = 4
    gsp_prompts_per_group: int = 8
    gsp_system_prompt_len: int = 512
    gsp_question_len: int = 64
    gsp_output_len: int = 64
    # multi-turn
    mt_turns: int = 4
    mt_turn_len: int = 64
    # sharegpt
    dataset_path: Path | None = None
    sharegpt_output_len: int | None = None   # None: the length of the recorded answer
    sharegpt_max_len: int = 2048             # prompt + answer tokens (vLLM's filter)
    sharegpt_multi_turn: bool = False

    def describe(self) -> dict[str, str | int | float | bool | None]:
        """The options that matter for this dataset, for the summary."""
        prefix = {"random": "random_", "shared-prefix": "gsp_", "multi-turn": "mt_",
                  "sharegpt": "sharegpt_"}[self.name]
        keep = {"name", "num_prompts", "seed", "dataset_path"}
        if self.name in ("multi-turn",):
            keep |= {"random_output_len", "random_range_ratio"}
        out: dict[str, str | int | float | bool | None] = {}
        for key, value in asdict(self).items():
            if key in keep or key.startswith(prefix):
                out[key] = str(value) if isinstance(value, Path) else value
        return out
