"""Multimodal (image + text) experiments: LLaVA / InternVL data formats, image loading, the default
image-question dataset built offline from sklearn / scikit-image images, and VQA / MME scorers.

Modules: `formats` (LLaVA conversation JSON/JSONL, InternVL meta.json), `images` (PIL loading,
CLIP / ImageNet normalisation), `dataset` (the default dataset), `metrics` (VQA accuracy, exact
match, MME acc / acc+).
"""
