"""The code-generating VLM (paper 4.2): LLaVA with a Phi-3 language model.

* ``tokenizer``: byte-level BPE trained on the dataset's VQA text (cpu preset)
* ``model``: tiny (cpu) or pretrained (paper) LLaVA + processor, LoRA/QLoRA, export and loading
* ``module``: the LightningModule (answer-only code/bbox loss, torchmetrics validation)
* ``relabel``: VLM instructions for the diffusion-policy data (``make relabel-dp``)

Inference: ``policies.vlm_planner.VLMPlanner``; data: ``datamodules.vqa``.
"""
