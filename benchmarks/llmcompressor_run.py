"""Run llm-compressor's GPTQ or AWQ on a checkpoint with pre-encoded calibration inputs; print its timings.

Runs inside the llm-compressor venv (benchmarks/setup_llmcompressor.sh), never the project's: it pins
its own torch and transformers. The inputs are the exact tensors tlq's processor made for the same
calibration file (``torch.save``d by benchmarks/cost.py), so both tools see the same tokens. The recipe
is llm-compressor's own Qwen2-VL example: GPTQ (or AWQ with its default Qwen2 mappings) on every decoder
Linear, W4A16 (int4, group 128), one decoder layer per sequential step, with the ignore list tlq's
adapter keeps 16-bit for the model's family (vision tower, projector or merger, LM head; passed as JSON by
benchmarks/cost.py): Qwen2-VL's example list, ``re:.*visual.*``, would quantize LLaVA-OneVision's tower.

    .venv-llmcompressor/bin/python benchmarks/llmcompressor_run.py MODEL INPUTS.pt OUT [gptq|awq] [IGNORE_JSON]
"""

from __future__ import annotations

import json
import sys
import time


def recipe_for(method: str, ignore: list[str]) -> list:
    """llm-compressor's modifier for ``method``, as its Qwen2-VL examples configure it, ignoring ``ignore``."""
    if method == "awq":
        from llmcompressor.modifiers.awq import AWQModifier

        return [AWQModifier(targets="Linear", scheme="W4A16_ASYM", ignore=ignore)]
    from llmcompressor.modifiers.quantization import GPTQModifier

    return [GPTQModifier(targets="Linear", scheme="W4A16", ignore=ignore)]


def main(model_dir: str, inputs_path: str, out: str, method: str = "gptq", ignore_json: str = '["lm_head", "re:.*visual.*"]') -> int:
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    t0 = time.perf_counter()
    # As tlq computes: float32 on CPU, the checkpoint's bf16 on a GPU (where oneshot's sequential pipeline
    # onloads each decoder layer to the device by itself).
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.bfloat16 if torch.cuda.is_available() else torch.float32)
    samples = torch.load(inputs_path)
    ds = Dataset.from_list([{k: v.tolist() for k, v in s.items()} for s in samples])
    t_load = time.perf_counter() - t0

    def collate(batch: list[dict]) -> dict:
        assert len(batch) == 1
        return {k: torch.tensor(v) for k, v in batch[0].items()}

    layer_class = type(model.model.language_model.layers[0]).__name__
    recipe = recipe_for(method, json.loads(ignore_json))
    t1 = time.perf_counter()
    # oneshot insists on a processor when given a dataset; the VLM processor needs torchvision, which this
    # venv's torch 2.13 has no wheel of here, and the inputs are encoded already: the tokenizer serves.
    oneshot(model=model, processor=AutoTokenizer.from_pretrained(model_dir), dataset=ds, recipe=recipe, num_calibration_samples=len(samples), max_seq_length=1 << 20,
            data_collator=collate, sequential_targets=[layer_class])
    t_oneshot = time.perf_counter() - t1
    t2 = time.perf_counter()
    model.save_pretrained(out, save_compressed=True)
    t_save = time.perf_counter() - t2
    print(json.dumps({"load": t_load, "oneshot (vision tower, propagation, GPTQ)": t_oneshot, "export": t_save}))
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:6]))
