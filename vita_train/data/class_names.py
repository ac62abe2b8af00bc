"""Class names of the datasets VITA is released for; label k is the k-th name (category id k + 1)."""

from __future__ import annotations

YTVIS_2019: tuple[str, ...] = (
    "person", "giant_panda", "lizard", "parrot", "skateboard", "sedan", "ape", "dog", "snake",
    "monkey", "hand", "rabbit", "duck", "cat", "cow", "fish", "train", "horse", "turtle", "bear",
    "motorbike", "giraffe", "leopard", "fox", "deer", "owl", "surfboard", "airplane", "truck",
    "zebra", "tiger", "elephant", "snowboard", "boat", "shark", "mouse", "frog", "eagle",
    "earless_seal", "tennis_racket",
)

YTVIS_2021: tuple[str, ...] = (
    "airplane", "bear", "bird", "boat", "car", "cat", "cow", "deer", "dog", "duck", "earless_seal",
    "elephant", "fish", "flying_disc", "fox", "frog", "giant_panda", "giraffe", "horse", "leopard",
    "lizard", "monkey", "motorbike", "mouse", "parrot", "person", "rabbit", "shark", "skateboard",
    "snake", "snowboard", "squirrel", "surfboard", "tennis_racket", "tiger", "train", "truck",
    "turtle", "whale", "zebra",
)

OVIS: tuple[str, ...] = (
    "Person", "Bird", "Cat", "Dog", "Horse", "Sheep", "Cow", "Elephant", "Bear", "Zebra", "Giraffe",
    "Poultry", "Giant_panda", "Lizard", "Parrot", "Monkey", "Rabbit", "Tiger", "Fish", "Turtle",
    "Bicycle", "Motorcycle", "Airplane", "Boat", "Vehical",
)

COCO: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)

DATASET_CLASSES: dict[str, tuple[str, ...]] = {
    "ytvis_2019": YTVIS_2019,
    "ytvis_2021": YTVIS_2021,
    "ovis": OVIS,
    "coco": COCO,
}


def dataset_key(dataset_name: str) -> str | None:
    """Map a detectron2 dataset name (e.g. ``ytvis_2019_val``) to a key of DATASET_CLASSES."""
    name = dataset_name.lower()
    for key in ("ytvis_2019", "ytvis_2021", "ovis", "coco"):
        if name.startswith(key):
            return key
    return None


def class_names_for(dataset_name: str) -> tuple[str, ...] | None:
    """Class names of a known dataset name, or None when the dataset is not known."""
    key = dataset_key(dataset_name)
    return DATASET_CLASSES[key] if key else None
