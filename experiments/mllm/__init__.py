"""The multimodal job: LLaVA-style experts (ViT + projector + decoder) partitioned by image features.

`task.MultimodalTask` implements the engine's `Task` (`experiments.engine`). Modules: `config`,
`formats` (LLaVA conversation JSON/JSONL, InternVL meta.json), `images` (PIL loading, CLIP /
ImageNet normalisation), `dataset` (the default dataset built offline from sklearn /
scikit-image images), `text` (chat template, tokenizer, image-token expansion), `data` (data
stage, `MultimodalData`), `modeling` (models, LLaVA loss, scoring, mixture decoding), `pretrained`
(``init_from``: a LLaVA / InternVL checkpoint's weights, tokenizer and template), `chat` (the
processor's prompt layout under a chat template), `routing` (tower or CLIP partition features),
`validation` (validation batches for model selection), `metrics` (VQA accuracy, exact match, MME
acc / acc+), `scorers` (benchmark families), `evaluate`, `report`, `plots`. See docs/multimodal.md
and docs/paper_recipe.md.
"""
