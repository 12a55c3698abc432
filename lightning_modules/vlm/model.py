"""Building, adapting and exporting the LLaVA-style code VLM (paper 4.2).

Two ways to get a ``LlavaForConditionalGeneration`` and its ``LlavaProcessor``:

* ``build_tiny``: random init from small configs (a CLIP vision tower + a Phi-3 text model), with
  the tokenizer trained on the dataset (``tokenizer.train_tokenizer``): the ``cpu`` preset.
* ``build_pretrained``: a pretrained Phi-3 language model and CLIP/SigLIP vision tower loaded with
  ``from_pretrained`` (hub names or local folders), a fresh projector, optionally the language
  model in 4-bit (QLoRA via bitsandbytes): the ``paper`` preset.

``apply_lora`` adds LoRA adapters (peft) to the language model's attention and MLP projections
and keeps the projector trainable. ``export_vlm`` writes a self-contained folder (LoRA merged,
4-bit weights dequantised) that ``load_vlm`` reads back without the training config.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import (AutoConfig, AutoImageProcessor, AutoModel, AutoModelForCausalLM, AutoTokenizer,
                          CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor,
                          Phi3Config)

from configs.errors import CheckpointError, ConfigError

from .tokenizer import IMAGE

META_FILE = "vlm.json"
FORMAT = "code2action-vlm"
LM_PROJECTIONS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")  # Phi-3 attention + MLP


def _plain(cfg) -> dict:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)


# ---------------------------------------------------------------------------- tiny (cpu preset)
def tiny_processor(tokenizer, image_size: int, patch_size: int) -> LlavaProcessor:
    """LlavaProcessor: CLIP image preprocessing at ``image_size`` + the trained tokenizer."""
    from transformers import CLIPImageProcessorPil

    image_processor = CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                            crop_size={"height": image_size, "width": image_size})
    # The CLIP tower prepends a CLS token, which the "default" feature strategy drops again.
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
                          vision_feature_select_strategy="default", image_token=IMAGE,
                          num_additional_image_tokens=1)


def build_tiny(model_cfg, processor: LlavaProcessor) -> LlavaForConditionalGeneration:
    """Random-init LLaVA from ``model_cfg.vision`` / ``model_cfg.text`` sizes (cpu preset)."""
    tok = processor.tokenizer
    m = _plain(model_cfg)
    vision = CLIPVisionConfig(image_size=m["image_size"], **m["vision"])
    text = Phi3Config(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id,
                      original_max_position_embeddings=m["text"]["max_position_embeddings"], **m["text"])
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=processor.image_token_id,
                         vision_feature_layer=m["vision_feature_layer"],
                         vision_feature_select_strategy="default", projector_hidden_act="gelu",
                         image_seq_length=(m["image_size"] // m["vision"]["patch_size"]) ** 2)
    torch.manual_seed(int(m.get("init_seed", 0)))
    model = LlavaForConditionalGeneration(config)
    _set_token_ids(model, tok)
    return model


def _set_token_ids(model, tok) -> None:
    gc = model.generation_config
    gc.bos_token_id, gc.eos_token_id, gc.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id


# ---------------------------------------------------------------------------- pretrained (paper preset)
def pretrained_processor(text_model: str, vision_model: str, vision_feature_select_strategy="default"):
    tok = AutoTokenizer.from_pretrained(text_model, padding_side="right")
    if IMAGE not in tok.get_vocab():
        tok.add_special_tokens({"additional_special_tokens": [IMAGE]})
    if tok.pad_token_id is None:
        tok.pad_token = tok.unk_token or tok.eos_token
    image_processor = AutoImageProcessor.from_pretrained(vision_model)
    vcfg = AutoConfig.from_pretrained(vision_model)
    vcfg = getattr(vcfg, "vision_config", vcfg)
    # CLIP prepends a CLS token (dropped by the "default" strategy); SigLIP has none.
    extra = 1 if vcfg.model_type.startswith("clip") else 0
    strategy = vision_feature_select_strategy if extra else "full"
    return LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=vcfg.patch_size,
                          vision_feature_select_strategy=strategy, image_token=IMAGE,
                          num_additional_image_tokens=extra)


def build_pretrained(model_cfg, processor: LlavaProcessor) -> LlavaForConditionalGeneration:
    """LLaVA from a pretrained Phi-3 (``text_model``) and vision tower (``vision_model``).

    The projector is new (random init, as LLaVA stage 1); with ``load_in_4bit`` the language
    model's linear layers are NF4-quantised (QLoRA). Needs the weights locally or the hub.
    """
    from transformers import BitsAndBytesConfig

    m = _plain(model_cfg)
    dtype = getattr(torch, m.get("dtype", "float32"))
    quant = None
    if m["load_in_4bit"]:
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=dtype)
    lm = AutoModelForCausalLM.from_pretrained(m["text_model"], dtype=dtype, quantization_config=quant)
    tok = processor.tokenizer
    if len(tok) > lm.get_input_embeddings().num_embeddings:
        lm.resize_token_embeddings(len(tok))
    vcfg = AutoConfig.from_pretrained(m["vision_model"])
    if hasattr(vcfg, "vision_config"):  # a dual encoder (CLIP/SigLIP): keep its vision half
        vision = _vision_only(vcfg.model_type, m["vision_model"], dtype)
    else:
        vision = AutoModel.from_pretrained(m["vision_model"], dtype=dtype)
    config = LlavaConfig(vision_config=vision.config, text_config=lm.config, image_token_id=processor.image_token_id,
                         vision_feature_layer=m["vision_feature_layer"],
                         vision_feature_select_strategy=processor.vision_feature_select_strategy,
                         projector_hidden_act="gelu")
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    model.model.vision_tower = vision
    model.model.language_model = lm.model
    model.lm_head = lm.lm_head
    model.model.multi_modal_projector = LlavaMultiModalProjector(config).to(dtype)
    model.config.text_config.vocab_size = lm.get_input_embeddings().num_embeddings
    if quant is not None:
        model.is_loaded_in_4bit = True
    _set_token_ids(model, tok)
    if not m["train_vision"]:
        model.model.vision_tower.requires_grad_(False)
    return model


def _vision_only(model_type: str, name: str, dtype):
    """The vision tower of a dual-encoder checkpoint (CLIP/SigLIP with a text half)."""
    from transformers import CLIPVisionModel, SiglipVisionModel

    cls = CLIPVisionModel if model_type == "clip" else SiglipVisionModel
    return cls.from_pretrained(name, dtype=dtype)


def apply_lora(model, lora_cfg, quantized: bool = False, gradient_checkpointing: bool = False):
    """LoRA on the language model's attention/MLP projections; projector stays trainable."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    c = _plain(lora_cfg)
    if quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    names = "|".join(c["target_modules"])
    config = LoraConfig(r=c["r"], lora_alpha=c["alpha"], lora_dropout=c["dropout"], bias="none",
                        target_modules=rf".*language_model.*\.({names})")
    model = get_peft_model(model, config)
    for p in model.base_model.model.model.multi_modal_projector.parameters():
        p.requires_grad_(True)
    return model


def build_vlm(model_cfg, processor):
    """The model a config asks for: tiny or pretrained, then LoRA if enabled."""
    build = build_pretrained if model_cfg.pretrained else build_tiny
    model = build(model_cfg, processor)
    if model_cfg.lora.enabled:
        model = apply_lora(model, model_cfg.lora, quantized=bool(model_cfg.load_in_4bit),
                           gradient_checkpointing=bool(model_cfg.gradient_checkpointing))
    elif model_cfg.load_in_4bit:
        raise ConfigError("model.load_in_4bit needs model.lora.enabled=true (QLoRA trains adapters only)")
    if model_cfg.gradient_checkpointing and not model_cfg.load_in_4bit:
        model.gradient_checkpointing_enable()
    return model


# ---------------------------------------------------------------------------- export / load
def plain_model(model) -> LlavaForConditionalGeneration:
    """A plain LLaVA from a training model: LoRA merged, 4-bit layers dequantised (a new object
    when there were adapters; the given model is otherwise returned as is)."""
    import copy

    if hasattr(model, "merge_and_unload"):
        model = copy.deepcopy(model).merge_and_unload()
    _dequantize_4bit(model)
    return model


def _dequantize_4bit(model) -> None:
    try:
        import bitsandbytes as bnb
    except ImportError:  # nothing can be quantised then
        return
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, bnb.nn.Linear4bit):
                w = bnb.functional.dequantize_4bit(child.weight.data, child.weight.quant_state)
                dense = torch.nn.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                                        dtype=w.dtype, device=w.device)
                dense.weight.data.copy_(w)
                if child.bias is not None:
                    dense.bias.data.copy_(child.bias.data)
                setattr(module, child_name, dense)
    if getattr(model, "is_loaded_in_4bit", False):
        model.is_loaded_in_4bit = False
    for cfg in (model.config, getattr(model.config, "text_config", None)):
        if cfg is not None and hasattr(cfg, "quantization_config"):
            del cfg.quantization_config


def export_vlm(model, processor, folder, meta: dict | None = None) -> Path:
    """Write ``folder`` (config.json, weights, processor files, vlm.json) atomically enough: files
    go to ``folder.tmp`` first and the folder is renamed into place."""
    import shutil

    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    plain = plain_model(model)
    plain.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    info = {"format": FORMAT, "version": 1, **(meta or {})}
    (tmp / META_FILE).write_text(json.dumps(info, indent=1))
    old = folder.with_name(folder.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)
    return folder


def load_vlm(folder, device: str = "cpu", dtype: str = "float32"):
    """(model, processor, meta) from an ``export_vlm`` folder; CheckpointError if it is not one."""
    folder = Path(folder)
    meta_path = folder / META_FILE
    if not meta_path.is_file():
        raise CheckpointError(f"{folder} is not an exported VLM (no {META_FILE}); train one with "
                                f"`make train-vlm`, which writes <out>/export")
    meta = json.loads(meta_path.read_text())
    processor = LlavaProcessor.from_pretrained(folder)
    model = LlavaForConditionalGeneration.from_pretrained(folder, dtype=getattr(torch, dtype)).to(device).eval()
    return model, processor, meta
