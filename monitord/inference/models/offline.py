"""Building tokenizers with no hub: a byte-level BPE trained on the spot.

CLAP's text tower needs a RoBERTa tokenizer; where none can be downloaded (tests, the
benchmark's random-weight model) one is trained offline and loaded back the way a real one
is, with ``from_pretrained(folder)``: transformers 5.x silently ignores vocab/merges files
passed to ``RobertaTokenizerFast`` directly and yields a 5-token vocabulary.
"""

from __future__ import annotations

from pathlib import Path

WORDS = (
    "this is a sound of glass breaking dog barking speech music silence noise tone beep "
    "engine rain cat applause cheering alarm knock hum whine crowd door car horn siren baby crying"
)


def train_roberta_tokenizer(folder: Path, text: str = WORDS, vocab_size: int = 400):
    from tokenizers import ByteLevelBPETokenizer, processors
    from transformers import RobertaTokenizerFast

    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([text] * 20, vocab_size=vocab_size, min_frequency=1, special_tokens=specials)
    bpe.post_processor = processors.RobertaProcessing(("</s>", bpe.token_to_id("</s>")), ("<s>", bpe.token_to_id("<s>")))
    folder.mkdir(parents=True, exist_ok=True)
    bpe.save(str(folder / "tokenizer.json"))
    tokenizer = RobertaTokenizerFast.from_pretrained(str(folder), model_max_length=64)
    if len(tokenizer) <= 50:
        raise RuntimeError("the trained tokenizer lost its vocabulary")
    return tokenizer
