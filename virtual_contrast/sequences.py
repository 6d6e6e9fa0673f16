"""The exam's sequences, each listed once: what every other part of the study derives its names from.

One row per sequence an exam may hold. Each row says how the sequence is called in every place the study
names it: the raw key (the column of a subjects table, the key of a subject's raw files), the channel it
becomes after pre-processing (file names, ``model.channels``), its BIDS-like file name, its BraTS file suffixes,
its role in a DICOM exam, what it is registered to, and whether it is a network input or the target. The
subjects table reader, the BIDS and BraTS discovery, the exclusions, the DICOM import rules, the workflow's
rules, the command line and the model all read this table, so adding a sequence is one row.

Three sequences are needed whatever the model's inputs are: the pre-contrast T1 (the anchor of registration
and of every enhancement map), the full-dose T1c (the target) and a low-dose T1c (what vir-T1c is compared
with and exported over; acquired, or simulated from the other two when ``low_dose.simulate`` is on). The
others are needed when they are one of ``model.channels``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

#: What a sequence's rigid alignment with the T1 may compare (:attr:`Sequence.align_feature`); the first is
#: the default.
ALIGN_FEATURES = ("intensity", "gradient")

#: ``registered_to`` of the sequence that is registered to the atlas (12 DOF); every other sequence is
#: registered rigidly to that one.
ATLAS = "atlas"


@dataclass(frozen=True)
class Sequence:
    """One sequence of an exam (see the module docstring)."""

    key: str  # raw key: subjects-table column, key of the raw files, DICOM role
    channel: str  # name after pre-processing (file names, model.channels)
    label: str  # for people: messages, exclusion reasons, the DICOM import report
    datatype: str  # BIDS datatype folder of the raw file
    suffix: str  # BIDS suffix of the raw file
    entities: tuple[tuple[str, str], ...] = ()  # BIDS entities of the raw file (ce-low, ce-full)
    brats: tuple[
        str, ...
    ] = ()  # suffixes of the file in a BraTS-style case folder (2023 and 2021 naming)
    registered_to: str = "T1w"  # ATLAS, or the channel it is aligned with (rigidly)
    role: str = "input"  # "input" (may be a network input), "target" (the full-dose T1c)
    #: Files that come with it, by key and extension: needed ones are subjects-table columns too (the
    #: DWI's b-values), the others are only written beside it (the DWI's gradient directions).
    companions: tuple[str, ...] = ()
    extra_files: tuple[str, ...] = ()
    #: The image its alignment is estimated on, when not the sequence itself (the ADC map is aligned
    #: through its DWI's mean b0, which has the anatomy): a key of the ``adc`` rule's outputs.
    align_on: str = ""
    #: The channel is a map computed from the series (the ADC from the DWI, rule adc), not the series
    #: itself resampled: a normalised volume of it is given by the channel's name (``--adc``).
    computed: bool = False
    #: What its rigid alignment with the T1 compares: "intensity" (mutual information of the images) or
    #: "gradient" (of their gradient magnitudes, edges against edges), for a contrast whose intensities
    #: within the T1's brain mislead mutual information (see ``virtual_contrast.preprocess.register``).
    align_feature: str = ALIGN_FEATURES[0]

    @property
    def columns(self) -> tuple[str, ...]:
        """The subjects-table columns of this sequence: its own and its companions'."""
        return (self.key, *self.companions)


#: Every sequence, in the paper's order of inputs and then the target.
SEQUENCES: tuple[Sequence, ...] = (
    Sequence("t1", "T1w", "T1w", "anat", "T1w", brats=("t1n", "t1"), registered_to=ATLAS),
    Sequence("t2", "T2w", "T2w", "anat", "T2w", brats=("t2w", "t2"), align_feature="gradient"),
    Sequence("flair", "FLAIR", "FLAIR", "anat", "FLAIR", brats=("t2f", "flair")),
    Sequence(
        "dwi",
        "ADC",
        "DWI",
        "dwi",
        "dwi",
        companions=("bval",),
        extra_files=("bvec",),
        align_on="b0",
        computed=True,
    ),  # the ADC map is computed from it (rule adc)
    Sequence("low", "lowT1c", "low-dose T1c", "anat", "T1w", entities=(("ce", "low"),)),
    Sequence(
        "ref",
        "refT1c",
        "full-dose T1c",
        "anat",
        "T1w",
        entities=(("ce", "full"),),
        brats=("t1c", "t1ce"),
        role="target",
    ),
)

BY_KEY: dict[str, Sequence] = {s.key: s for s in SEQUENCES}
BY_CHANNEL: dict[str, Sequence] = {s.channel: s for s in SEQUENCES}
#: Raw keys (the sequence columns of a subjects table), and every column with the companions.
KEYS: tuple[str, ...] = tuple(s.key for s in SEQUENCES)
COLUMNS: tuple[str, ...] = tuple(c for s in SEQUENCES for c in s.columns)
#: Every channel after pre-processing, inputs and target.
CHANNELS: tuple[str, ...] = tuple(s.channel for s in SEQUENCES)
#: Channels a model may take as input, and the target.
INPUT_CHANNELS: tuple[str, ...] = tuple(s.channel for s in SEQUENCES if s.role == "input")
TARGET: str = next(s.channel for s in SEQUENCES if s.role == "target")
#: The sequence registered to the atlas, the low dose and the target: needed whatever the model's inputs.
ANCHOR: str = next(s.channel for s in SEQUENCES if s.registered_to == ATLAS)
LOW_DOSE: str = "lowT1c"
ALWAYS_NEEDED: tuple[str, ...] = (ANCHOR, LOW_DOSE, TARGET)
#: Labels of every column (companions included) for messages.
COLUMN_LABELS: dict[str, str] = {
    **{s.key: s.label for s in SEQUENCES},
    "bval": "DWI b-values",
}


def study_channels(inputs: Iterable[str]) -> tuple[str, ...]:
    """The channels a study pre-processes: the model's inputs and the three that are always needed, in the
    table's order (``["FLAIR", "lowT1c"]`` gives ``("T1w", "FLAIR", "lowT1c", "refT1c")``)."""
    wanted = set(inputs) | set(ALWAYS_NEEDED)
    unknown = wanted - set(CHANNELS)
    if unknown:
        raise ValueError(f"unknown channel(s) {sorted(unknown)}; known: {list(CHANNELS)}")
    return tuple(c for c in CHANNELS if c in wanted)


def raw_columns(channels: Iterable[str], *, simulated_low_dose: bool = False) -> tuple[str, ...]:
    """The subjects-table columns an exam needs for ``channels`` (companions included); without the low
    dose's when it is simulated (it is then made from the pre-contrast T1 and the full-dose T1c)."""
    keys = []
    for channel in channels:
        sequence = BY_CHANNEL[channel]
        if simulated_low_dose and channel == LOW_DOSE:
            continue
        keys += sequence.columns
    return tuple(c for c in COLUMNS if c in keys)


def exam_files(keys: Iterable[str]) -> tuple[str, ...]:
    """The files of an exam's sequences ``keys`` (raw keys): each sequence's own, its companions and its extra
    files (``["t1", "dwi"]`` gives ``("t1", "dwi", "bval", "bvec")``)."""
    files = []
    for key in keys:
        seq = BY_KEY[key]
        files += [key, *seq.companions, *seq.extra_files]
    return tuple(files)


def channel_of(key: str) -> str:
    """The channel that the raw key ``key`` becomes (``"t1"`` -> ``"T1w"``, ``"dwi"`` -> ``"ADC"``)."""
    return BY_KEY[key].channel


def key_of(channel: str) -> str:
    """The raw key of ``channel`` (``"ADC"`` -> ``"dwi"``)."""
    return BY_CHANNEL[channel].key


def exam_channels(inputs: Iterable[str]) -> tuple[str, ...]:
    """The channels a new exam is pre-processed into for a model taking ``inputs``: the inputs, the anchor
    and the low dose (vir-T1c is mapped back onto its grid), without the target, which a new exam lacks."""
    return tuple(c for c in study_channels(inputs) if c != TARGET)


def normalised_flag(channel: str) -> str:
    """The command-line flag of ``channel`` given as a normalised volume: the raw key's (``--t1``), or the
    channel's own name when the channel is a map computed from its series (``--adc``, from the DWI)."""
    sequence = BY_CHANNEL[channel]
    return f"--{channel.lower() if sequence.computed else sequence.key}"
