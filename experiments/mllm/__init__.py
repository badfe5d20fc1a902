"""The multimodal job: LLaVA-style experts (ViT + projector + decoder) partitioned by image features.

`task.MultimodalTask` implements the engine's `Task` (`experiments.engine`). Modules: `config`,
`formats` (LLaVA conversation JSON/JSONL, InternVL meta.json), `images` (PIL loading, CLIP /
ImageNet normalisation), `dataset` (the default dataset built offline from sklearn /
scikit-image images), `text` (chat template, tokenizer, image-token expansion), `data` (data
stage, `MultimodalData`), `modeling` (models, LLaVA loss, scoring, mixture decoding), `metrics`
(VQA accuracy, exact match, MME acc / acc+), `evaluate`, `report`, `plots`. See docs/multimodal.md.
"""
