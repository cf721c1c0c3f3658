"""Named concepts (issue 21): labels of SAE latents with evidence and a (calibrated) confidence
(:mod:`.label`), supernodes (:mod:`.supernodes`), Network-Dissection labels on a user's segmentation
folder (:mod:`.dissection`) and the open-vocabulary labeller interface (:mod:`.labeller`).

Only :mod:`.label` is imported here (it is cheap and the CAFE build uses it); import the others explicitly.
"""

from .label import (
    CALIBRATION_FILE,
    LABELS_FILE,
    RAW_CONFIDENCE,
    UNCALIBRATED,
    Calibration,
    ConceptLabel,
    evidence_shares,
    label_all,
    label_from_shares,
    label_latent,
    labels_document,
    load_calibration,
    parse_calibration,
    read_labels,
    search_labels,
    value_name,
)

__all__ = ["CALIBRATION_FILE", "LABELS_FILE", "RAW_CONFIDENCE", "UNCALIBRATED", "Calibration", "ConceptLabel",
           "evidence_shares", "label_all", "label_from_shares", "label_latent", "labels_document",
           "load_calibration", "parse_calibration", "read_labels", "search_labels", "value_name"]
