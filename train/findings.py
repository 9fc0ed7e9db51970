"""An auxiliary findings loss for SFT on medsynth: heads on the projected image tokens predict each image's ground
truth (modality, region, lesion presence, count, side, upper/lower, size, contrast), and their mean cross-entropy,
times `findings_loss`, is added to the language-model loss. `FindingsHeads` learns a linear head per fact;
`WordHeads` has no weights and scores each fact's classes by the tokens' cosine to the LLM's embeddings of the
words captions use (the loss of train/findings_words.py), so the tokens come to look like words the LLM can copy.
With gradient accumulation the auxiliary loss is added per micro-batch, unscaled.

Why: the LLM's loss alone teaches the projector and the tower's trained blocks to carry the lesion facts only
weakly (linear probes: presence 0.80 on the starter's features, against disks a small CNN finds every time), and
the answers then read them at chance. The heads put a direct gradient on the image tokens the LLM reads. They
are training-time only: the checkpoint stays a plain Llava (the heads are never saved into it).

Why by hand: transformers and TRL have no auxiliary-loss hook for SFT; this is a collator that adds a `findings`
tensor and a trainer mixin that reads the projector's output through a forward hook.

Labels come from the `instances_<split>.jsonl` files beside each training file (medsynth's ground truth), matched
by image path; rows whose images have none (other data) add nothing to the findings loss.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

from medllava.processing import AssistantOnlyCollator
from train.findings_words import FACT_WORDS, first_token, word_scores

logger = logging.getLogger("medllava.train")

# The facts a head predicts, from an instance's fields; lesion attributes are "none" without a lesion.
FACTS = ("modality", "region", "present", "count", "side", "position", "size", "contrast")


def instance_facts(instance: dict) -> dict[str, str]:
    """One instance's facts as strings (the heads' classes)."""
    count = int(instance.get("count") or 0)
    facts = {
        "modality": str(instance["modality"]),
        "region": str(instance["region"]),
        "present": "yes" if count else "no",
        "count": str(count),
    }
    for key in ("side", "position", "size", "contrast"):
        facts[key] = str(instance.get(key) or "none")
    return facts


class FindingsLabels:
    """Image path -> class index per fact, from the instances files beside the given training files."""

    def __init__(self, data_files):
        facts_by_image: dict[str, dict[str, str]] = {}
        dirs = sorted({Path(f).resolve().parent for f in data_files})
        for folder in dirs:
            for path in sorted(folder.glob("instances_*.jsonl")):
                with open(path, encoding="utf-8") as f:
                    for line in f:
                        if line.strip():
                            inst = json.loads(line)
                            facts_by_image[str((folder / inst["image"]).resolve())] = instance_facts(inst)
        if not facts_by_image:
            raise FileNotFoundError(
                f"findings_loss needs medsynth ground truth (instances_<split>.jsonl) beside the training files; "
                f"none in {[str(d) for d in dirs]}"
            )
        self.classes = {fact: sorted({facts[fact] for facts in facts_by_image.values()}) for fact in FACTS}
        self.index = {
            image: [self.classes[fact].index(facts[fact]) for fact in FACTS]
            for image, facts in facts_by_image.items()
        }
        logger.info(
            "findings labels for %d images: %s",
            len(self.index),
            {fact: len(c) for fact, c in self.classes.items()},
        )

    def __call__(self, image_path: str) -> list[int]:
        return self.index.get(str(Path(image_path).resolve()), [-100] * len(FACTS))


class FindingsCollator(AssistantOnlyCollator):
    """AssistantOnlyCollator plus `findings`: (images in the batch, len(FACTS)) class indices, -100 unknown, in the
    order the processor lays the images out (row by row, then within a row)."""

    def __init__(self, processor, labels: FindingsLabels):
        # no max_length: SFT drops over-long rows before training, so every example here is encoded
        super().__init__(processor)
        self.labels = labels

    def __call__(self, examples: list[dict]) -> dict:
        batch = super().__call__(examples)
        rows = [self.labels(p) for e in examples for p in e.get("images") or []]
        batch["findings"] = torch.tensor(rows, dtype=torch.long).reshape(-1, len(FACTS))
        return batch


class FindingsHeads(nn.Module):
    """One linear head per fact on [mean; max] of an image's projected tokens."""

    def __init__(self, hidden: int, classes: dict[str, list[str]]):
        super().__init__()
        self.sizes = [len(classes[fact]) for fact in FACTS]
        self.norm = nn.LayerNorm(2 * hidden)
        self.linear = nn.Linear(2 * hidden, sum(self.sizes))

    def forward(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        pooled = torch.cat([tokens.mean(dim=1), tokens.amax(dim=1)], dim=-1)
        return list(self.linear(self.norm(pooled.float())).split(self.sizes, dim=-1))


class WordHeads(nn.Module):
    """Heads with no weights of their own: a fact's class is scored by how close the image's projected tokens come
    to the LLM's input embedding of the word a caption uses for it (train.findings_words: log-sum-exp over tokens
    of cosine / temperature). Facts without such words (presence) and "none" values are not scored."""

    def __init__(
        self, embeddings: torch.Tensor, tokenizer, classes: dict[str, list[str]], temperature: float = 0.05
    ):
        super().__init__()
        self.temperature = temperature
        words = {fact: {str(k): v for k, v in table.items()} for fact, table in FACT_WORDS.items()}
        self.scored: list[bool] = []
        self.none: list[int | None] = []
        protos = []
        for fact in FACTS:
            table = words.get(fact, {c: c for c in classes[fact]} if fact == "region" else None)
            self.scored.append(table is not None)
            self.none.append(classes[fact].index("none") if "none" in classes[fact] else None)
            if table is None:
                protos.append(None)
                continue
            ids = [first_token(tokenizer, table.get(c, c)) for c in classes[fact]]
            protos.append(embeddings[ids].detach().float())
        for i, proto in enumerate(protos):
            self.register_buffer(
                f"proto{i}", proto if proto is not None else torch.empty(0), persistent=False
            )

    def targets(self, findings: torch.Tensor) -> torch.Tensor:
        findings = findings.clone()
        for i, (scored, none) in enumerate(zip(self.scored, self.none, strict=True)):
            if not scored:
                findings[:, i] = -100
            elif none is not None:
                findings[findings[:, i] == none, i] = -100
        return findings

    def forward(self, tokens: torch.Tensor) -> list[torch.Tensor | None]:
        return [
            word_scores(tokens, getattr(self, f"proto{i}"), self.temperature) if scored else None
            for i, scored in enumerate(self.scored)
        ]


def find_projector(model) -> nn.Module:
    for name, module in model.named_modules():
        if name.endswith("multi_modal_projector"):
            return module
    raise ValueError("findings_loss: the model has no multi_modal_projector")


class FindingsMixin:
    """Mixed into the SFT trainer: adds `findings_weight` x the findings heads' mean cross-entropy to the loss.
    Set `findings_heads` and `findings_weight` before training; the heads get their own optimizer group (the
    projector's learning rate, else the trainer's)."""

    findings_heads: FindingsHeads | None = None
    findings_weight: float = 0.0

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        heads_params = list(self.findings_heads.parameters()) if self.findings_heads is not None else []
        if heads_params and not getattr(self, "_findings_group", False):
            lr = getattr(self.args, "projector_lr", None) or self.args.learning_rate
            optimizer.add_param_group(
                {"params": list(self.findings_heads.parameters()), "lr": lr, "weight_decay": 0.0}
            )
            # the Trainer zeroes only the model's gradients (model.zero_grad()): without this the heads' would add
            # up over every step (found as a findings loss climbing 1.3 -> 9 in 40 steps)
            heads = self.findings_heads
            optimizer.register_step_post_hook(lambda *_: heads.zero_grad(set_to_none=True))
            self._findings_group = True
        return optimizer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        findings = inputs.pop("findings", None)
        if self.findings_heads is None or findings is None or not (findings >= 0).any():
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        captured = []
        handle = find_projector(model).register_forward_hook(lambda m, a, out: captured.append(out))
        try:
            # return_outputs only as asked: with True, TRL's fused LM head runs a second forward for the logits
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        finally:
            handle.remove()
        loss, outputs = result if return_outputs else (result, None)
        tokens = captured[0]
        if tokens.dim() == 2:
            tokens = tokens.reshape(findings.shape[0], -1, tokens.shape[-1])
        self.findings_heads.to(tokens.device)
        logits = self.findings_heads(tokens)
        findings = findings.to(tokens.device)
        if hasattr(self.findings_heads, "targets"):
            findings = self.findings_heads.targets(findings)
        losses = [
            nn.functional.cross_entropy(lg, findings[:, i], ignore_index=-100)
            for i, lg in enumerate(logits)
            if lg is not None and (findings[:, i] >= 0).any()
        ]
        if not losses:
            return (loss, outputs) if return_outputs else loss
        aux = torch.stack(losses).mean()
        self._findings_losses = getattr(self, "_findings_losses", []) + [aux.item()]
        loss = loss + self.findings_weight * aux.to(loss.dtype)
        return (loss, outputs) if return_outputs else loss

    def log(self, logs, *args, **kwargs):
        seen = getattr(self, "_findings_losses", [])
        if seen and "loss" in logs:
            logs = {**logs, "findings_loss": round(sum(seen) / len(seen), 4)}
            self._findings_losses = []
        return super().log(logs, *args, **kwargs)
