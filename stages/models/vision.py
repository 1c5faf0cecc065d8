"""Vision-language models: which folders hold one, the reward/value class for them, and the embedded
tiny LLaVA.

- A folder holds a VLM when its config has a `vision_config` (LLaVA, Qwen2-VL, ...): the policy loads
  through `AutoModelForImageTextToText`, and the tokenizer gets the folder's processor attached
  (`modeling.load_tokenizer`), which `stages/data/tokens.py` uses to encode prompts with images.
- transformers has no sequence-classification head for LLaVA, so the reward model and PPO's critic
  use `LlavaForSequenceClassification` below: LLaVA's own backbone (vision tower, projector,
  language model; the same weight names as `LlavaForConditionalGeneration`, so it initialises from
  the SFT policy's folder) with a scalar `score` head read at the last real token, registered with
  `AutoModelForSequenceClassification` so the scalar loader takes it like any other.
- The embedded tiny LLaVA (`data=embedded_vision`): a CLIP vision tower of one layer on 16x16 images
  (2x2 patches of 8 pixels: 4 image tokens per image, CLS dropped as LLaVA does), a two-layer MLP
  projector and the embedded tiny Llama as language model.
"""

from __future__ import annotations

import functools

import torch

from stages.data.images import IMAGE_TOKEN

IMAGE_SIZE = 16
PATCH_SIZE = 8


def is_vlm(config) -> bool:
    return getattr(config, "vision_config", None) is not None


def folder_is_vlm(path, *, trust_remote_code: bool = False) -> bool:
    from transformers import AutoConfig

    return is_vlm(AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code))


@functools.cache
def register_scalar_class() -> type:
    """`LlavaForSequenceClassification`, registered with transformers' auto class (once)."""
    from transformers import AutoModelForSequenceClassification, LlavaConfig, LlavaModel, LlavaPreTrainedModel
    from transformers.modeling_outputs import SequenceClassifierOutputWithPast

    class LlavaForSequenceClassification(LlavaPreTrainedModel):
        def __init__(self, config) -> None:
            super().__init__(config)
            self.num_labels = config.num_labels
            self.model = LlavaModel(config)
            self.score = torch.nn.Linear(config.text_config.hidden_size, config.num_labels, bias=False)
            self.post_init()

        def get_input_embeddings(self):
            return self.model.get_input_embeddings()

        def set_input_embeddings(self, value) -> None:
            self.model.set_input_embeddings(value)

        def forward(self, input_ids=None, attention_mask=None, position_ids=None, pixel_values=None, **kwargs):
            hidden = self.model(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, pixel_values=pixel_values
            ).last_hidden_state
            logits = self.score(hidden)
            if attention_mask is None:
                last = torch.full((hidden.shape[0],), hidden.shape[1] - 1, device=hidden.device)
            else:
                last = (attention_mask * torch.arange(attention_mask.shape[1], device=hidden.device)).argmax(dim=1)
            pooled = logits[torch.arange(hidden.shape[0], device=hidden.device), last]
            return SequenceClassifierOutputWithPast(logits=pooled)

    LlavaForSequenceClassification.__module__ = __name__
    AutoModelForSequenceClassification.register(LlavaConfig, LlavaForSequenceClassification, exist_ok=True)
    return LlavaForSequenceClassification


def build_processor(tokenizer):
    """The embedded model's processor: CLIP's image preprocessing at 16x16 and the word-level
    tokenizer, which gets the `<image>` token."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    # special even where the vocabulary has it as a word: the expanded `<image><image>...` must split
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]}, replace_extra_special_tokens=False)
    images = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, do_center_crop=True
    )
    return LlavaProcessor(
        image_processor=images,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS, which the "default" strategy drops
        image_token=IMAGE_TOKEN,
        chat_template=tokenizer.chat_template,
    )


def build_tiny_llava(cfg, tokenizer, seed: int):
    """A LLaVA of the embedded sizes (cfg: `stages.models.modeling.ModelConfig`)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    vision = CLIPVisionConfig(
        hidden_size=cfg.vision_hidden_size,
        intermediate_size=2 * cfg.vision_hidden_size,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        projection_dim=cfg.vision_hidden_size,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_attention_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2,
        tie_word_embeddings=False,
    )
    config.pad_token_id, config.eos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    return LlavaForConditionalGeneration(config)
