"""vlfast <-> Hugging Face `Blip2ForConditionalGeneration` (+ `Blip2Processor`).

BLIP-2's class is exactly vlfast's input connector: a `Blip2VisionModel` tower whose `post_layernorm`
is the VPG's ln_vision, the query tokens, the Q-Former, `language_projection` = the projector, and
the LLM reading the projected queries in place of `num_query_tokens` `<image>` tokens placed before
the text (/work/shared/REFERENCE.md section 2). So the exported model, given input ids = the image
tokens + what vlfast's LLM reads (CaptionCollator.prefix_ids, then the text), computes vlfast's
logits. The `<image>` token's rows, when they are new to the LLM's vocabulary, are zero: its input row
is always replaced, and its logit (0) is one the model never learnt; pass generate
`suppress_tokens=[config.image_token_index]` to rule it out (from_hf_blip2 does).
"""
from __future__ import annotations

import copy
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from vlfast.data.coco import MEAN, STD
from vlfast.data.collate import CaptionCollator
from vlfast.models import VPG, VisionLanguageModel
from vlfast.models.qformer import QFormerConfig, hf_qformer_state_dict
from vlfast.models.vision import POST_NORMED_TOWERS
from vlfast.patch import is_patched

SAVE_VLFAST = ("VisionLanguageModel.save_pretrained (python -m vlfast.export --format vlfast) writes a vlfast "
               "model directory instead")
# Why another tower cannot become BLIP-2's vision_model, where it is more than another architecture.
TOWER_PROBLEMS = {
    "clip_vision_model": "CLIP's ViT normalises the patch embeddings before its encoder (pre_layrnorm) and projects "
                         "q, k and v separately with a key bias, which BLIP-2's vision class cannot express",
}


def check_exportable(model: VisionLanguageModel) -> None:
    """ValueError saying why `model` cannot be a Hugging Face BLIP-2, if it cannot."""
    if model.connector != "input":
        raise ValueError(f"the {model.connector} connector (MemVP) feeds the visual prompts to every FFN of the LLM: "
                         f"BLIP-2's class cannot express MemVP; {SAVE_VLFAST}")
    if is_patched(model.llm, "mma"):
        raise ValueError(f"BLIP-2's class cannot express the mixture-of-modality adapters in the LLM; {SAVE_VLFAST}")
    if model.vision_tower is None:
        raise ValueError("this model has no vision tower (it was trained on cached features): build it with its "
                         "tower to export it as BLIP-2")
    kind = model.vision_tower.config.model_type
    if kind not in POST_NORMED_TOWERS:
        why = TOWER_PROBLEMS.get(kind, f"BLIP-2's vision_model is a Blip2VisionModel and {kind} is another "
                                       f"architecture")
        raise ValueError(f"the vision tower ({type(model.vision_tower).__name__}) cannot be exported as BLIP-2's: "
                         f"{why}; {SAVE_VLFAST}")
    if model.tokenizer is None:
        raise ValueError("this model has no tokenizer: BLIP-2's processor needs one")


def _qformer_config(vpg: VPG):
    from transformers import Blip2QFormerConfig

    config = vpg.config.qformer
    return Blip2QFormerConfig(hidden_size=config.hidden_size, num_hidden_layers=config.num_layers,
                              num_attention_heads=config.num_heads, intermediate_size=config.intermediate_size,
                              hidden_act=config.hidden_act, hidden_dropout_prob=config.hidden_dropout,
                              attention_probs_dropout_prob=0.0,  # vlfast's fused attention has none
                              layer_norm_eps=config.layer_norm_eps,
                              cross_attention_frequency=config.cross_attention_frequency,
                              encoder_hidden_size=config.encoder_hidden_size)


def hf_qformer_state(vpg: VPG) -> dict[str, Tensor]:
    """The VPG's Q-Former in Hugging Face's Blip2QFormerModel names: the inverse of hf_qformer_state_dict."""
    from transformers import Blip2QFormerModel

    config: QFormerConfig = vpg.config.qformer
    with torch.device("meta"):
        template = Blip2QFormerModel(_qformer_config(vpg)).state_dict()
    # hf_qformer_state_dict hands back the very tensors it is given for every one-to-one name, so
    # their identity maps vlfast's names to Hugging Face's; only the stacked cross key/value is split here.
    theirs = {id(tensor): name for name, tensor in template.items()}
    ours = vpg.qformer.state_dict()
    out = {theirs[id(tensor)]: ours[name] for name, tensor in hf_qformer_state_dict(template, config).items()
           if not name.startswith("cross_key_value.")}
    for p in ("weight", "bias"):
        rows = ours[f"cross_key_value.{p}"].split(config.hidden_size)
        for j, layer in enumerate(config.cross_layers):
            for k, part in enumerate(("key", "value")):
                out[f"encoder.layer.{layer}.crossattention.attention.{part}.{p}"] = rows[2 * j + k]
    return out


def _image_processor(tower):
    from transformers import BlipImageProcessor
    from transformers.image_utils import PILImageResampling

    size = tower.config.image_size
    return BlipImageProcessor(size={"height": size, "width": size}, image_mean=list(MEAN), image_std=list(STD),
                              resample=PILImageResampling.BICUBIC, do_convert_rgb=True)


def _encode_prompts_as_vlfast(tokenizer, llm: nn.Module) -> None:
    """Make `tokenizer(prompt)` (what Blip2Processor calls) give CaptionCollator.prefix_ids(prompt):
    bos + prompt for a causal LM, prompt + eos for T5. Llama's, OPT's and T5's tokenizers already
    do; a word-level one (the embedded default's) gets the template."""
    from tokenizers import processors

    probe = "a photo of"
    expected = CaptionCollator.for_llm(tokenizer, llm).prefix_ids(probe)
    if tokenizer(probe)["input_ids"] == expected:
        return
    encoder_decoder = llm.config.is_encoder_decoder
    special = tokenizer.eos_token if encoder_decoder else tokenizer.bos_token
    template = "$A " + special if encoder_decoder else special + " $A"
    if hasattr(tokenizer, "backend_tokenizer") and special is not None:
        ids = [(special, tokenizer.convert_tokens_to_ids(special))]
        tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(single=template, special_tokens=ids)
    if tokenizer(probe)["input_ids"] != expected:
        warnings.warn(f"Blip2Processor's tokenizer encodes prompts unlike vlfast (which reads {expected} for "
                      f"{probe!r}): build the input ids as the image tokens + CaptionCollator.prefix_ids(prompt)",
                      stacklevel=3)


def to_hf_blip2(model: VisionLanguageModel, out_dir: str | Path) -> Path:
    """Writes `model` (input connector, no adapters, a Blip2VisionModel tower) to `out_dir` as a
    Hugging Face Blip2ForConditionalGeneration with its Blip2Processor, all in the LLM's dtype (a
    half-precision LLM's export holds a half-precision VPG and tower); returns out_dir. `model` is
    not changed. The LLM's embedding rows grow to cover the new `<image>` token when they must."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor

    check_exportable(model)
    tower, vpg, llm = model.vision_tower, model.vpg, model.llm
    if vpg.config.vision_layer_norm_eps != tower.config.layer_norm_eps:
        warnings.warn(f"the VPG's ln_vision has eps {vpg.config.vision_layer_norm_eps} but BLIP-2's post_layernorm "
                      f"takes the vision config's layer_norm_eps {tower.config.layer_norm_eps}, which the tower's own "
                      f"norms use too: the export's outputs differ slightly from vlfast's", stacklevel=2)
    tokenizer = copy.deepcopy(model.tokenizer)
    processor = Blip2Processor(_image_processor(tower), tokenizer, num_query_tokens=vpg.config.num_query_tokens)
    _encode_prompts_as_vlfast(tokenizer, llm)
    image_token = tokenizer.convert_tokens_to_ids(processor.image_token.content)
    config = Blip2Config(vision_config=tower.config.to_dict(), qformer_config=_qformer_config(vpg).to_dict(),
                         text_config=llm.config.to_dict(), num_query_tokens=vpg.config.num_query_tokens,
                         image_token_index=image_token)
    state = {f"vision_model.{k}": v for k, v in tower.state_dict().items()}
    state |= {f"qformer.{k}": v for k, v in hf_qformer_state(vpg).items()}
    state |= {f"language_model.{k}": v for k, v in llm.state_dict().items()}
    state |= {"vision_model.post_layernorm.weight": vpg.ln_vision.weight,
              "vision_model.post_layernorm.bias": vpg.ln_vision.bias, "query_tokens": vpg.query_tokens,
              "language_projection.weight": vpg.projector.weight, "language_projection.bias": vpg.projector.bias}
    hf, info = Blip2ForConditionalGeneration.from_pretrained(
        None, config=config, state_dict={k: v.detach() for k, v in state.items()}, output_loading_info=True,
        dtype=llm.dtype)
    unloaded = {k: sorted(v) for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys")
                and v}
    if unloaded:
        raise ValueError(f"the model does not map onto Blip2ForConditionalGeneration: {unloaded}")
    rows = hf.get_input_embeddings().num_embeddings
    if rows < len(tokenizer):
        hf.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        with torch.no_grad():  # <image>'s input row is never read (the prompts replace it); its logit is 0
            for embedding in {id(e): e for e in (hf.get_input_embeddings(), hf.get_output_embeddings())}.values():
                embedding.weight[rows:] = 0
    out_dir = Path(out_dir)
    hf.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


def from_hf_blip2(directory: str | Path) -> VisionLanguageModel:
    """A Hugging Face BLIP-2 directory (an export, or Salesforce's) as a vlfast input-connector model
    in eval mode: its vision_model as the tower (vlfast reads it before post_layernorm, which
    becomes the VPG's ln_vision), VPG.from_hf, its language model, the processor's tokenizer. The
    `<image>` token is suppressed in generation (vlfast places the prompts itself)."""
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    hf = Blip2ForConditionalGeneration.from_pretrained(directory)
    tokenizer = Blip2Processor.from_pretrained(directory).tokenizer
    llm = hf.language_model
    if hf.config.image_token_index is not None:
        llm.generation_config.suppress_tokens = [hf.config.image_token_index]
    return VisionLanguageModel(hf.vision_model, VPG.from_hf(hf), llm, tokenizer=tokenizer).eval()
