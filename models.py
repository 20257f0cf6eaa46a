"""Every pydantic schema of the API but generation's (api/generation_models.py), and the stored sample
format. No torch here."""

from __future__ import annotations

import unicodedata
from datetime import datetime
from enum import Enum
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, Json, model_validator

from config import DIALOG_MESSAGES_BOUND, MESSAGE_CHARS_BOUND

NAME_MAX_CHARS = 128  # a name in a chat: Telegram allows 128 characters
# Direction embeddings, overrides and isolates: they reorder how a name reads, so no name holds one.
BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
MAX_DIALOG_MESSAGES = DIALOG_MESSAGES_BOUND
MAX_MESSAGE_CHARS = MESSAGE_CHARS_BOUND
MAX_OFFSET = 10**9  # beyond any real list; larger numbers overflow SQLite's 64-bit integers

# Invisible marks phones and messengers put around names ("\u202a+234 903 186 6339\u202c"): stripped at the ends.
EDGE_MARKS = "\u200b\u200c\u200d\u200e\u200f\u2060\ufeff" + "".join(sorted(BIDI_CONTROLS))


def normalise_name(value: object) -> object:
    """NFC, without the spaces and invisible marks around it (the one normalisation of every name:
    schemas, exports and aliases)."""
    if not isinstance(value, str):
        return value
    return unicodedata.normalize("NFC", value).strip().strip(EDGE_MARKS).strip()


def refused_in_name(ch: str) -> bool:  # what no name holds: controls, surrogates, line/paragraph separators, bidi
    return unicodedata.category(ch) in ("Cc", "Cs", "Zl", "Zp") or ch in BIDI_CONTROLS


def _check_display_name(name: str) -> str:
    """Any speaker (non-empty by min_length) is printable; joiners stay: emoji families like 👨\u200d👩\u200d👧 need U+200D."""
    if any(map(refused_in_name, name)):
        raise ValueError("speaker must not contain control or invisible format characters")
    return name


DisplayName = Annotated[
    str,
    BeforeValidator(normalise_name),
    Field(min_length=1, max_length=NAME_MAX_CHARS, examples=["User2"]),
    AfterValidator(_check_display_name),
]
SpeakerName = Annotated[
    str,
    BeforeValidator(normalise_name),
    Field(
        min_length=1,
        max_length=NAME_MAX_CHARS,
        description="Any printable name (emoji, '+', quotes, ':' included); NFC-normalised, trimmed of spaces and "
        "invisible direction or zero-width marks.",
        examples=["User1"],
    ),
    AfterValidator(_check_display_name),
]


# --- stored data (parser.py writes it, train.py reads it) -------------------------------------


class Turn(BaseModel):
    """One message of a dialog. Sent by clients inside /upload-text; stored as context."""

    model_config = ConfigDict(strict=True)  # no silent coercion: 5 is not a message, "true" not a bool

    speaker: DisplayName
    content: str = Field(max_length=MAX_MESSAGE_CHARS, examples=["Привіт! Як справи?"])


class Sample(BaseModel):
    """One training sample: what the speaker replied, and the turns that came before it."""

    id: str = Field(description="sha256 of context and reply; identical samples are stored once.")
    context: list[Turn]
    reply: str
    added_at: datetime


class SpeakerFile(BaseModel):
    """`./data/<speaker>_messages.json`."""

    speaker: str
    version: int = 1
    messages: list[Sample] = []


# --- /upload-text ------------------------------------------------------------------------------

SAMPLE_DIALOG = [
    {"speaker": "User1", "content": "Привіт! Як справи?"},
    {"speaker": "User2", "content": "Все добре, дякую."},
    {"speaker": "User1", "content": "Підемо кави вип'ємо?"},
]


class UploadTextRequest(BaseModel):
    """Sent by clients: a dialog and the speaker whose messages to keep."""

    model_config = ConfigDict(strict=True, json_schema_extra={"examples": [{"dialog": SAMPLE_DIALOG, "speaker": "User1"}]})

    dialog: list[Turn] = Field(min_length=1, max_length=MAX_DIALOG_MESSAGES)
    speaker: SpeakerName

    @model_validator(mode="after")
    def _speaker_in_dialog(self) -> UploadTextRequest:
        names = list(dict.fromkeys(turn.speaker for turn in self.dialog))
        if self.speaker not in names:
            raise ValueError(f"speaker '{self.speaker}' does not occur in the dialog; its speakers are {names}")
        return self

    def over_limits(self, max_messages: int, max_chars: int) -> list[dict]:
        """The operator's limits (MAX_DIALOG_MESSAGES, MAX_MESSAGE_CHARS settings), when lower than the
        schema's own bounds: each problem in the shape of a validation error."""
        problems = []
        if len(self.dialog) > max_messages:
            problems.append({"type": "too_long", "loc": ("body", "dialog"), "input": None,
                             "msg": f"List should have at most {max_messages} items (MAX_DIALOG_MESSAGES)"})
        for i, turn in enumerate(self.dialog):
            if len(turn.content) > max_chars:
                problems.append({"type": "string_too_long", "loc": ("body", "dialog", i, "content"), "input": None,
                                 "msg": f"String should have at most {max_chars} characters (MAX_MESSAGE_CHARS)"})
        return problems


class UploadTextResponse(BaseModel):
    """Answer to /upload-text."""

    message: str = Field(examples=["Successfully saved messages for User1"])
    filepath: str = Field(examples=["./data/User1_messages.json"])
    speaker: str
    added: int = Field(description="New messages stored by this upload.")
    duplicates: int = Field(description="Messages of this upload that were already stored.")
    skipped_empty: int = Field(description="Messages of the speaker with no text, not stored.")
    total: int = Field(description="Messages stored for the speaker after this upload.")


# --- /upload-file and speakers ------------------------------------------------------------------


class CleaningOptions(BaseModel):
    """Cleaning steps for exports, each on by default."""

    drop_system: bool = Field(True, description="Drop service/system lines (joins, calls, encryption notices).")
    drop_media: bool = Field(True, description="Drop media placeholders and deleted-message notices.")
    merge_consecutive: bool = Field(True, description="Merge consecutive messages of one speaker into one turn.")
    split_gap_minutes: float = Field(
        180, ge=0, le=525_600, description="Start a new dialog after a silence this long (0: never), so context never spans unrelated conversations."
    )
    mask_pii: bool = Field(True, description="Replace e-mail addresses, phone numbers and card-like numbers.")
    drop_empty: bool = Field(True, description="Drop messages left without text.")


class ExportForm(BaseModel):
    """Form fields of /exports/inspect (and of /upload-file), beside the file itself."""

    format: Literal["auto", "telegram", "whatsapp", "discord", "messenger", "instagram", "native"] = Field(
        "auto", description="auto-detected by default: Telegram result.json, WhatsApp .txt/.zip, DiscordChatExporter "
        "JSON, Messenger/Instagram message_1.json (or their .zip), or /upload-text JSON.",
    )
    chat: str | None = Field(None, description="Full Telegram export: the chat's name or id, or 'all' (default).")


class UploadFileForm(ExportForm, CleaningOptions):
    """Form fields of /upload-file, beside the file itself."""

    speaker: SpeakerName
    aliases: Json[dict[str, str]] | None = Field(
        None, description='JSON object mapping names to one speaker, e.g. {"Olena K": "Олена"}.', examples=['{"Olena K": "Олена"}']
    )


class SpeakerStats(BaseModel):
    messages: int
    tokens: int = Field(description="Tokens by the base model's tokenizer when available locally, else words.")


class UploadFileResponse(UploadTextResponse):
    """Answer to /upload-file."""

    format: str = Field(examples=["telegram"])
    chats: list[str] = Field(description="Names of the chats read.")
    report: dict[str, int] = Field(description="What each cleaning step read, removed, merged or masked; skipped_lines: text before a chat's first message.")
    speakers: dict[str, SpeakerStats] = Field(description="Per speaker in the cleaned export.")
    token_counter: str = Field(description="'tokenizer' or 'words'.")
    warnings: list[str] = []


class ParticipantStats(BaseModel):
    name: str
    messages: int = Field(description="Text messages, before cleaning (no system lines, media or deleted ones).")


class ExportInspection(BaseModel):
    """Answer to /exports/inspect: what the export holds; nothing is stored."""

    format: str = Field(examples=["whatsapp"])
    chats: list[str]
    first_message: datetime | None
    last_message: datetime | None
    participants: list[ParticipantStats] = Field(description="Most messages first.")


class SpeakerPublic(BaseModel):
    speaker: str
    messages: int
    last_upload: datetime | None
    adapter: bool = Field(description="Whether a trained adapter exists.")
    trained_at: datetime | None = None
    error: str | None = Field(None, description="Why the speaker's stored messages cannot be read (the rest is then empty).")
    memory: int | None = Field(None, description="Messages the speaker's memory holds; null until it is first built.")


class SpeakersPublic(BaseModel):
    data: list[SpeakerPublic]
    count: int


ExportKind = Literal["merged", "gguf"]
JobKind = Literal["train", "export_merged", "export_gguf"]
Dtype = Literal["float32", "bfloat16", "float16"]


class ExportConfig(BaseModel):
    """What an export job makes (stored with the job, as a training's TrainConfig is)."""
    export: ExportKind
    dtype: Dtype = Field("float32", description="merged: the weights' type (bfloat16 halves the files; the merge is float32).")


class ExportQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")
    wait: bool = Field(False, description="Answer when the export is done (200 with it), not at once (202 with its job).")
    dtype: Dtype = ExportConfig.model_fields["dtype"]


class ExportPublic(BaseModel):  # where an export is and how to download it
    speaker: str
    kind: ExportKind = Field(description="'merged': a transformers folder with the adapter merged in (vLLM, TGI, "
                             "transformers); 'gguf': the adapter as a llama.cpp GGUF LoRA, the base GGUF and an Ollama Modelfile.")
    files: dict[str, int] = Field(description="The export's files and their sizes in bytes.")
    created_at: datetime
    seconds: float = Field(description="How long the export took.")
    url: str = Field(description="GET it for the export as a zip.")


class SamplesPublic(BaseModel):
    data: list[Sample]
    count: int


class RenderedSample(BaseModel):
    """A training sample exactly as the model sees it."""

    sample_id: str
    recalled: list[str] = Field([], description="The person's earlier messages recalled into this sample's prompt.")
    prompt: str = Field(description="The rendered context; not trained on.")
    completion: str = Field(description="The trained span: the speaker's reply and the end-of-turn marker.")
    marked: str = Field(description="prompt + completion, the trained span between ⟦ and ⟧.")
    tokens: int
    supervised_tokens: int
    context_turns_dropped: int


class DatasetPublic(BaseModel):
    base_model: str
    chat_template_source: str
    max_seq_length: int
    data: list[RenderedSample]
    count: int = Field(description="Samples stored for the speaker.")


class DeletedPublic(BaseModel):
    message: str
    deleted: list[str]


# --- /train and jobs ---------------------------------------------------------------------------


class TrainRequest(BaseModel):
    """Sent by clients: whom to train, and optional overrides of the training defaults."""

    model_config = ConfigDict(strict=True, json_schema_extra={"examples": [{"speaker": "User1", "wait": True}]})

    speaker: SpeakerName
    wait: bool = Field(False, description="Answer only when training has finished (200), not at once (202).")
    epochs: float | None = Field(
        None, gt=0, le=100,
        description="Passes over the data; by default (EPOCHS unset) as many as the amount of data needs: more for a few dozen messages, one from a few hundred on.",
    )
    learning_rate: float | None = Field(None, gt=0, le=1, description="Defaults to the LEARNING_RATE setting.")
    max_steps: int | None = Field(None, ge=1, le=1_000_000, description="Stop after this many steps.")
    batch_size: int = Field(1, ge=1, le=256, description="Packed sequences (or samples, when batch_tokens=0) per step.")
    batch_tokens: int | None = Field(
        None, ge=0, le=1_000_000,
        description="Tokens per packed sequence; defaults to the BATCH_TOKENS setting; 0 = no packing.",
    )
    max_seq_length: int | None = Field(
        None, ge=16, le=32768, description="Tokens per sample; defaults to the MAX_SEQ_LENGTH setting."
    )


class TrainConfig(BaseModel):
    """The resolved configuration of one training run (stored with the job and the adapter)."""

    base_model: str
    load_in_8bit: bool
    quant: Literal["8bit", "4bit", "none"] | None = Field(None, description="Quantization; unset: from load_in_8bit.")
    device: str
    epochs: float | None = Field(description="Passes over the data; None: chosen from the number of samples (train.auto_epochs).")
    learning_rate: float
    max_steps: int | None
    batch_size: int
    max_seq_length: int
    seed: int
    batch_tokens: int = Field(0, description="Tokens per packed sequence; 0 = one sample per sequence.")
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.1
    target_modules: list[str] = ["q_proj", "v_proj"]
    checkpoint_steps: int = Field(0, description="Save a resumable checkpoint every N steps; 0 = off.")
    eval_fraction: float = Field(0.0, description="Share of samples held out of training for evaluation.")
    eval_min_samples: int = Field(10, description="Hold out only from speakers with at least this many samples.")
    memory_k: int = Field(0, description="Messages recalled into each sample's context from the training split (MEMORY_K).")
    keep_best_patience: int = Field(0, description="Passes without a better held-out loss before training stops; the best pass is kept (KEEP_BEST_PATIENCE; 0: off).")
    preference_weight: float = Field(0.0, description="Weight of the DPO term against other participants' lines (PREFERENCE_WEIGHT; 0: off).")
    preference_beta: float = Field(0.1, description="DPO's beta (PREFERENCE_BETA).")
    preference_context_turns: int = Field(2, description="Context turns of each preference pair (PREFERENCE_CONTEXT_TURNS).")
    report_to: list[str] = Field(["none"], description="Experiment trackers (transformers' report_to).")


class JobStatus(str, Enum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


class JobProgress(BaseModel):
    """Live progress of a running job at a bounded rate; an export's steps are its stages."""

    step: int
    total_steps: int
    epoch: float = 0.0
    stage: str | None = Field(None, description="An export's current stage, e.g. 'merging the adapter into the base'.")
    loss: float | None = None
    tokens_per_second: float | None = Field(None, description="Non-padding tokens processed per second.")
    eta_s: float | None = Field(None, description="Estimated seconds to the end of training.")


class JobPublic(BaseModel):
    """A training or export job, as /train, the exports, /jobs and /jobs/{job_id} report it."""

    job_id: str
    speaker: str
    kind: JobKind = Field("train", description="'train', or the export it makes: 'export_merged', 'export_gguf'.")
    status: JobStatus
    url: str = Field(description="Where to poll this job.", examples=["/jobs/3f2c9a..."])
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    config: TrainConfig | ExportConfig
    progress: JobProgress | None = None
    result: dict[str, Any] | None = Field(None, description="Metrics and paths of a succeeded job.")
    error: str | None = Field(None, description="Why a failed job failed.")
    checkpoint: str | None = Field(None, description="Latest checkpoint; POST /jobs/{job_id}/resume continues from it.")
    cancel_requested: bool = False


class JobsQuery(BaseModel):
    """Query of GET /jobs. Unknown parameters are refused (422), so a typo never silently filters nothing."""

    model_config = ConfigDict(extra="forbid")

    speaker: SpeakerName | None = None
    status: JobStatus | None = None
    kind: JobKind | None = None
    limit: int = Field(50, ge=1, le=500)
    offset: int = Field(0, ge=0, le=MAX_OFFSET)


class PageQuery(BaseModel):
    """Query of paginated lists."""

    model_config = ConfigDict(extra="forbid")

    limit: int = Field(50, ge=1, le=1000)
    offset: int = Field(0, ge=0, le=MAX_OFFSET)


class DatasetQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    limit: int = Field(5, ge=1, le=100, description="How many samples to render.")


class DeleteQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    keep_adapter: bool = Field(False, description="Keep the trained adapter; delete only the messages.")


class EventsQuery(BaseModel):
    """Query of GET /jobs/{job_id}/events."""

    model_config = ConfigDict(extra="forbid")

    stream: bool = Field(True, description="Server-Sent Events (true) or the events so far as JSON (false).")
    after: int = Field(0, ge=0, le=2**62, description="Only events with a larger id (also read from Last-Event-ID).")


class JobsPublic(BaseModel):
    data: list[JobPublic]
    count: int


class JobEvent(BaseModel):
    """One event of a job: a status change, progress, a log line or an error."""

    id: int
    job_id: str
    created_at: datetime
    type: str = Field(examples=["status", "progress", "log", "error"])
    data: dict[str, Any]


class JobEventsPublic(BaseModel):
    data: list[JobEvent]
    count: int


class TrainCompleted(BaseModel):
    """Answer to /train with wait=true once training succeeded."""

    message: str = Field(examples=["Training completed successfully for User1"])
    model_path: str = Field(examples=["./output_lora/User1"])
    job: JobPublic


class HealthPublic(BaseModel):
    status: str = "ok"
    jobs_running: int
    jobs_queued: int
    model: str = Field(description="The base model: 'provisioning' (requests that need it get 503 meanwhile), "
                                   "'ready', or 'failed: <why>'.", examples=["ready"])


class ErrorPublic(BaseModel):
    """Every error answer: FastAPI's shape."""

    detail: str | dict[str, Any] | list[Any]
