from trl_longctx.tiny_models import build_char_tokenizer, build_tiny_qwen3


def test_char_tokenizer_round_trip_and_specials():
    tok = build_char_tokenizer()
    ids = tok("copy: k")["input_ids"]
    assert len(ids) == len("copy: k")
    assert tok.decode(ids) == "copy: k"
    assert tok.padding_side == "left"
    assert {tok.pad_token_id, tok.eos_token_id} <= set(range(len(tok)))


def test_tiny_qwen3_is_reproducible_with_head_dim_64():
    a, b = build_tiny_qwen3(48, seed=1), build_tiny_qwen3(48, seed=1)
    assert a.config.head_dim == 64
    assert all((p == q).all() for p, q in zip(a.parameters(), b.parameters(), strict=True))
