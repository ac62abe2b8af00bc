"""Video instance segmentation evaluation: the YouTube-VIS video AP/AR of the official evaluator."""

from vita_train.evaluation.ytvis import STAT_NAMES, EvaluationError, check_ground_truth, evaluate_ytvis

__all__ = ["STAT_NAMES", "EvaluationError", "check_ground_truth", "evaluate_ytvis"]
