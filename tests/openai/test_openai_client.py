"""The official `openai` client against the gateway's HTTP port."""
import base64
import io

import openai
import pytest
from PIL import Image


@pytest.fixture(scope="module")
def client(base_url, api_key):
    return openai.OpenAI(base_url=base_url + "/v1", api_key=api_key, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model(client):
    models = client.models.list().data
    assert models, "the server lists its model"
    return models[0].id


def ask(image_data_uri):
    return [{"role": "user", "content": [
        {"type": "text", "text": "What is in this picture?"},
        {"type": "image_url", "image_url": {"url": image_data_uri}},
    ]}]


def test_models(client, model):
    m = client.models.retrieve(model)
    assert m.id == model and m.object == "model"


def test_chat_with_an_image(client, model, image_data_uri):
    r = client.chat.completions.create(model=model, messages=ask(image_data_uri), max_tokens=8, temperature=0)
    assert r.object == "chat.completion"
    assert r.model == model
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.completion_tokens <= 8
    assert r.usage.prompt_tokens > 576, "the image's tokens are in the prompt"
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_streamed_with_usage(client, model, image_data_uri):
    full = client.chat.completions.create(model=model, messages=ask(image_data_uri), max_tokens=8, temperature=0)
    stream = client.chat.completions.create(
        model=model, messages=ask(image_data_uri), max_tokens=8, temperature=0,
        stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content, "greedy: same answer streamed"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    # The same prompt again: all but its last token come from the server's prefix cache.
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == chunks[-1].usage.prompt_tokens - 1


def decode(b64: str) -> Image.Image:
    img = Image.open(io.BytesIO(base64.b64decode(b64)))
    img.load()
    return img


def test_image_generation(client, model):
    r = client.images.generate(model=model, prompt="a red apple", n=2, size="384x384",
                               response_format="b64_json", extra_body={"seed": 5, "cfg_weight": 5.0})
    assert len(r.data) == 2
    for d in r.data:
        img = decode(d.b64_json)
        assert img.format == "PNG" and img.size == (384, 384)
    assert r.usage.output_tokens == 2 * 576


def test_image_generation_streamed_with_partial_images(client, model):
    stream = client.images.generate(model=model, prompt="a red apple", n=1, stream=True, partial_images=2)
    events = list(stream)
    partial = [e for e in events if e.type == "image_generation.partial_image"]
    completed = [e for e in events if e.type == "image_generation.completed"]
    assert [e.partial_image_index for e in partial] == [0, 1]
    assert len(completed) == 1 and events[-1] is completed[0]
    assert decode(completed[0].b64_json).size == (384, 384)
    assert decode(partial[0].b64_json).format == "PNG"
    assert completed[0].usage.output_tokens == 576


def test_bad_request_names_the_param(client, model):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], top_p=7)
    assert e.value.status_code == 400 and e.value.param == "top_p"
    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(model=model, prompt="x", size="1024x1024")
    assert e.value.param == "size" and "384x384" in str(e.value)
    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(model=model, prompt="x", response_format="url")
    assert e.value.param == "response_format"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], n=2)
    assert e.value.param == "n"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}])
    assert e.value.param == "messages[0].content[0].image_url"


def test_unknown_model_is_not_found(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert e.value.code == "model_not_found"


def test_wrong_key_is_an_authentication_error(base_url):
    bad = openai.OpenAI(base_url=base_url + "/v1", api_key="sk-not-a-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.models.list()
    assert e.value.status_code == 401 and "sk-not-a-key" not in str(e.value)
