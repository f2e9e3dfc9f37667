"""The HTTP layer in process: the real app, routes, job runner, SQLite store and artifact
stores (a directory, and S3 on moto's server), with fake stage handles instead of Ray.
Covers the generated OpenAPI document, the error shapes, and the OpenAI-style routes."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from fake_handles import QUALITY, VIDEO, ingress_app

from vidgen_serve.serving.settings import ServeSettings

KEY, OTHER = "k-one", "k-two"
AUTH = {"Authorization": f"Bearer {KEY}"}
SMALL = {"prompt": "a red fox", "duration": 1, "resolution": "480p", "num_inference_steps": 2}


def serving(settings: ServeSettings):
    return ingress_app(settings)


@pytest.fixture(autouse=True)
def _keys(monkeypatch):
    monkeypatch.setenv("VIDGEN_API_KEYS", f"{KEY},{OTHER}")


def _settings(tmp_path, **kw) -> ServeSettings:
    return ServeSettings(state_dir=tmp_path, job_heartbeat_s=0.1, max_queued_jobs=8, max_body_bytes=4096, **kw)


async def _until(client, url, done, headers=AUTH, tries=400):
    for _ in range(tries):
        body = (await client.get(url, headers=headers)).json()
        if done(body):
            return body
        await asyncio.sleep(0.02)
    raise AssertionError(f"{url}: {body}")


def _detail(resp, field):
    assert resp.status_code == 422, resp.text
    details = resp.json()["error"]["details"]
    found = [d for d in details if d["field"] == field]
    assert found, details
    return found[0]


def test_openapi_is_generated_from_the_models(tmp_path):
    async def body():
        async with serving(_settings(tmp_path)) as (client, _):
            spec = (await client.get("/openapi.json")).json()
        schemas = spec["components"]["schemas"]
        assert {"prompt", "duration", "fps", "resolution", "seed"} <= set(schemas["VideoRequest"]["properties"])
        gen = spec["paths"]["/v1/video/generate"]["post"]
        assert gen["requestBody"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/VideoRequest"}
        assert "video/mp4" in gen["responses"]["200"]["content"]
        batch = spec["paths"]["/v1/video/batch"]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert batch == {"$ref": "#/components/schemas/BatchRequest"}
        for path in ("/v1/videos", "/v1/videos/{vid}", "/v1/videos/{vid}/content", "/v1/video/jobs/{job_id}/content"):
            assert path in spec["paths"], path
        assert {"seconds", "size", "model", "style"} <= set(schemas["VideoCreate"]["properties"])
        assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"

    asyncio.run(body())


def test_error_shapes(tmp_path):
    async def body():
        async with serving(_settings(tmp_path)) as (client, _):
            post = client.post
            assert _detail(await post("/v1/video/jobs", json={**SMALL, "fps": 10}, headers=AUTH), "fps")["allowed"] \
                == "15..60"
            unknown = _detail(await post("/v1/video/jobs", json={**SMALL, "colour": 1}, headers=AUTH), "colour")
            assert unknown["message"] == "unknown field" and "prompt" in unknown["allowed"]
            bad_json = await post("/v1/video/jobs", content=b'{"prompt":', headers={**AUTH, "content-type":
                                                                                    "application/json"})
            assert _detail(bad_json, "body")["message"].startswith("not valid JSON")
            assert "JSON object" in _detail(await post("/v1/video/jobs", json=["x"], headers=AUTH), "body")["message"]
            no_type = await post("/v1/video/jobs", content=b'{"prompt": "x", "duration": 1, "resolution": "480p"}',
                                 headers=AUTH)  # JSON without a Content-Type header is still JSON
            assert no_type.status_code == 202, no_type.text
            batch = await post("/v1/video/batch", json={"requests": [SMALL, {**SMALL, "fps": 99}]}, headers=AUTH)
            assert _detail(batch, "requests.1.fps")["allowed"] == "15..60"
            style = _detail(await post("/v1/video/jobs", json={**SMALL, "style": "nope"}, headers=AUTH), "style")
            assert "realistic" in style["allowed"]
            big = await post("/v1/video/jobs", json={**SMALL, "prompt": "x" * 5000}, headers=AUTH)
            assert big.status_code == 413 and big.json()["error"]["code"] == "payload_too_large"

            async def chunks():  # no Content-Length: refused at the chunk that crosses the limit
                for _ in range(10):
                    yield b" " * 1000

            streamed = await post("/v1/video/jobs", content=chunks(), headers={**AUTH, "content-type":
                                                                               "application/json"})
            assert streamed.status_code == 413, streamed.text
            unauth = await post("/v1/video/jobs", json=SMALL)
            assert unauth.status_code == 401 and unauth.headers["www-authenticate"] == "Bearer"
            assert unauth.json()["error"]["code"] == "unauthorized"
            missing = await client.get("/v1/video/jobs/" + "ab" * 16, headers=AUTH)
            assert missing.status_code == 404 and set(missing.json()["error"]) == {"code", "message", "details",
                                                                                   "request_id"}

    asyncio.run(body())


def test_job_content_from_the_directory_store(tmp_path):
    async def body():
        async with serving(_settings(tmp_path)) as (client, _):
            r = await client.post("/v1/video/jobs", json=SMALL, headers=AUTH)
            assert r.status_code == 202, r.text
            job_id = r.json()["job_id"]
            job = await _until(client, f"/v1/video/jobs/{job_id}", lambda j: j["state"] == "succeeded")
            assert job["attempts"] == 1 and "store" in job["timings"]
            assert job["quality"] == QUALITY  # the Decoder's metrics, through the job store
            whole = await client.get(f"/v1/video/jobs/{job_id}/content", headers=AUTH)
            assert whole.status_code == 200 and whole.content == VIDEO
            assert whole.headers["content-type"] == "video/mp4"
            part = await client.get(f"/v1/video/jobs/{job_id}/content", headers={**AUTH, "Range": "bytes=4-11"})
            assert part.status_code == 206 and part.content == VIDEO[4:12]
            assert part.headers["content-range"] == f"bytes 4-11/{len(VIDEO)}"
            other = await client.get(f"/v1/video/jobs/{job_id}/content", headers={"Authorization": f"Bearer {OTHER}"})
            assert other.status_code == 404

    asyncio.run(body())


def test_sync_response_carries_the_quality_header(tmp_path):
    from vidgen_serve.media.quality import parse_quality_header

    async def body():
        async with serving(_settings(tmp_path)) as (client, _):
            r = await client.post("/v1/video/generate", json=SMALL, headers=AUTH)
            assert r.status_code == 200, r.text
            assert r.headers["x-vidgen-quality"] == "temporal_ssim=0.9312;temporal_psnr_db=27.41;flicker=0.9820"
            assert parse_quality_header(r.headers["x-vidgen-quality"]) == pytest.approx(QUALITY)

    asyncio.run(body())


def test_openai_videos(tmp_path):
    async def body():
        async with serving(_settings(tmp_path)) as (client, ingress):
            created = await client.post("/v1/videos", json={"prompt": "a red fox", "model": "sora-2", "seconds": "2",
                                                            "size": "854x480", "num_inference_steps": 2, "seed": 9},
                                        headers=AUTH)
            assert created.status_code == 200, created.text
            video = created.json()
            assert video["object"] == "video" and video["id"].startswith("video_")
            assert video["status"] in ("queued", "in_progress") and video["size"] == "854x480"
            assert video["seconds"] == "2" and video["model"] == "tiny"
            vid = video["id"]
            done = await _until(client, f"/v1/videos/{vid}", lambda v: v["status"] == "completed")
            assert done["progress"] == 100 and done["completed_at"] >= done["created_at"] and done["error"] is None
            assert done["quality_metrics"] == QUALITY and done["quality"] == "standard"  # OpenAI's tier field kept
            # The same job through our own API: same seed, same size.
            ours = (await client.get(f"/v1/video/jobs/{vid[6:]}", headers=AUTH)).json()
            assert ours["state"] == "succeeded" and ours["seed"] == 9
            content = await client.get(f"/v1/videos/{vid}/content", headers=AUTH)
            assert content.status_code == 200 and content.content == VIDEO
            assert (await client.get(f"/v1/videos/{vid}/content?variant=thumbnail", headers=AUTH)).status_code == 422

            # Listing pages newest first; another key sees none of them.
            second = (await client.post("/v1/videos", json={"prompt": "an owl", "size": "480x480"},
                                        headers=AUTH)).json()
            page = (await client.get("/v1/videos?limit=1", headers=AUTH)).json()
            assert page["object"] == "list" and [v["id"] for v in page["data"]] == [second["id"]]
            assert page["has_more"] is True and page["last_id"] == second["id"]
            rest = (await client.get(f"/v1/videos?limit=5&after={page['last_id']}", headers=AUTH)).json()
            assert [v["id"] for v in rest["data"]] == [vid] and rest["has_more"] is False
            assert (await client.get("/v1/videos", headers={"Authorization": f"Bearer {OTHER}"})).json()["data"] == []

            # Bad input names OpenAI's fields.
            bad = await client.post("/v1/videos", json={"prompt": "x", "size": "1000x1000"}, headers=AUTH)
            assert "854x480" in _detail(bad, "size")["message"]
            too_long = await client.post("/v1/videos", json={"prompt": "x", "seconds": 100, "size": "854x480"},
                                         headers=AUTH)
            assert _detail(too_long, "seconds")["value"] == 100

            # DELETE: an ended video and its MP4 are removed.
            gone = await client.delete(f"/v1/videos/{vid}", headers=AUTH)
            assert gone.json() == {"id": vid, "object": "video.deleted", "deleted": True}
            assert (await client.get(f"/v1/videos/{vid}", headers=AUTH)).status_code == 404
            assert not await ingress.artifacts.exists(f"{vid[6:]}.mp4")

    asyncio.run(body())


def test_s3_content_streams_with_range_or_redirects(tmp_path, s3_server, bucket):
    async def body():
        for redirect in (False, True):
            settings = _settings(tmp_path / str(redirect), artifact_store=f"s3://{bucket}/jobs",
                                 s3_endpoint_url=s3_server, artifact_redirect=redirect)
            async with serving(settings) as (client, _):
                job_id = (await client.post("/v1/video/jobs", json=SMALL, headers=AUTH)).json()["job_id"]
                await _until(client, f"/v1/video/jobs/{job_id}", lambda j: j["state"] == "succeeded")
                r = await client.get(f"/v1/video/jobs/{job_id}/content", headers={**AUTH, "Range": "bytes=0-7"})
                if redirect:
                    assert r.status_code == 307
                    url = r.headers["location"]
                    assert url.startswith(f"{s3_server}/{bucket}/jobs/{job_id}.mp4?")
                    async with httpx.AsyncClient(trust_env=False) as direct:
                        assert (await direct.get(url)).content == VIDEO
                else:
                    assert r.status_code == 206 and r.content == VIDEO[:8]
                    assert r.headers["content-range"] == f"bytes 0-7/{len(VIDEO)}"
                    whole = await client.get(f"/v1/video/jobs/{job_id}/content", headers=AUTH)
                    assert whole.status_code == 200 and whole.content == VIDEO

    asyncio.run(body())


def test_a_broken_store_fails_the_replica_start_naming_it(tmp_path, s3_server):
    """What Serve awaits when it starts an ingress or decoder replica: an unreachable job store
    or a bucket that does not exist fails the constructor with a message naming it (Serve
    then marks the deployment DEPLOY_FAILED with that message: the app never reports ready)."""
    import socket
    from fake_handles import make_stages

    from vidgen_serve.errors import VidgenError
    from vidgen_serve.serving.ingress import Ingress
    from vidgen_serve.serving.stages import DecoderDeployment

    settings = _settings(tmp_path, artifact_store="s3://no-such-vidgen-bucket/x", s3_endpoint_url=s3_server)
    orch = make_stages([])

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        url = f"redis://127.0.0.1:{sock.getsockname()[1]}/0"

    async def body():
        ingress = object.__new__(Ingress)
        with pytest.raises(VidgenError, match=f"cannot reach job_store {url}"):
            await ingress.__init__(_settings(tmp_path, job_store=url), orch.text_encoder, orch.denoisers, orch.decoder)
        ingress = object.__new__(Ingress)
        with pytest.raises(VidgenError, match="the bucket 'no-such-vidgen-bucket' does not exist"):
            await ingress.__init__(settings, orch.text_encoder, orch.denoisers, orch.decoder, orch.router)
        decoder = object.__new__(DecoderDeployment)
        with pytest.raises(VidgenError, match="no-such-vidgen-bucket"):
            await decoder.__init__(settings.model, settings)

    asyncio.run(body())


def test_prompt_attention_bad_input_is_422_and_parallel_profile_is_501(tmp_path):
    from vidgen_serve.config import AppConfig

    url = "/v1/prompt/attention"

    async def body():
        async with serving(_settings(tmp_path)) as (client, _):
            assert (await client.post(url, json={"prompt": "a fox"})).status_code == 401
            # Rejected before any stage is called (these fake stages have no attention methods).
            assert _detail(await client.post(url, json={"prompt": "a fox", "steps": 0}, headers=AUTH),
                           "steps")["allowed"] == "1..10"
            assert _detail(await client.post(url, json={"prompt": "a fox", "frames": 9}, headers=AUTH),
                           "frames")["allowed"] == "1..8"
            _detail(await client.post(url, json={"prompt": "x" * 501}, headers=AUTH), "prompt")
            _detail(await client.post(url, json={"prompt": ""}, headers=AUTH), "prompt")
            assert "realistic" in _detail(await client.post(url, json={"prompt": "a fox", "style": "vaporwave"},
                                                            headers=AUTH), "style")["allowed"]
            _detail(await client.post(url, json={"prompt": "a fox", "duration": 3}, headers=AUTH), "duration")
            spec = (await client.get("/openapi.json")).json()
            assert "image/png" in spec["paths"][url]["post"]["responses"]["200"]["content"]
        parallel = _settings(tmp_path / "tp", model=AppConfig(profile_overrides={"parallel": {"tp": 2}}))
        async with serving(parallel) as (client, _):
            resp = await client.post(url, json={"prompt": "a fox"}, headers=AUTH)
            assert resp.status_code == 501, resp.text
            assert resp.json()["error"]["code"] == "not_implemented" and "tp=2" in resp.json()["error"]["message"]

    asyncio.run(body())
