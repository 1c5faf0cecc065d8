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
- The embedded tiny LLaVA's processor and image geometry (`data=embedded_vision`): 16x16 images in 2x2
  patches of 8 pixels, 4 image tokens per image (CLS dropped as LLaVA does); the model itself is
  `stages.models.modeling.build_tiny_llava`, beside the tiny Llama it wraps.
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
