import torch

from dplm import model as models
from dplm.serialize import RowCodec


def test_value_embeddings_start_from_their_texts(census_schema):
    """A value token starts at the weighted mean of its text's embeddings, weights halving from
    the first token on (computed here by hand from the base embeddings), so "37" and "73" differ."""
    tokenizer = models.load_tokenizer("smollm2-135m")  # value tokens are added to it: not the shared one
    codec = RowCodec(census_schema, tokenizer, value_tokens=True)
    model = models.load_base_model("tiny-random", len(tokenizer))
    base = model.get_input_embeddings().weight.detach().clone()
    texts = codec.value_token_texts()
    models.init_value_embeddings(model, texts)
    weight = model.get_input_embeddings().weight.detach()
    for name in ("<|relationship=Husband|>", "<|age=37|>", "<|age=73|>"):
        token = tokenizer.convert_tokens_to_ids(name)
        ids = texts[token]
        w = torch.tensor([0.5**i for i in range(len(ids))])
        assert len(ids) > 1 and torch.allclose(weight[token], (w[:, None] * base[ids]).sum(0) / w.sum(), atol=1e-6)
    age = codec.fields[census_schema.names.index("age")].value_ids
    assert not torch.allclose(weight[age["37"]], weight[age["73"]])
