-- wrk script for the small-request scenario of bench/run.py: one manifest by tag, again and again.
-- The same request for every contender; only direct access to the registry adds the
-- Authorization header itself (the proxies add the ECR token upstream).
-- The method is GET: wrk 4.1 cannot count HEAD responses (its parser waits for the
-- Content-Length bytes a HEAD response never carries, so every connection stalls);
-- BENCH_METHOD=HEAD is honoured for a wrk that can.
wrk.method = os.getenv("BENCH_METHOD") or "GET"
wrk.headers["Accept"] = "application/vnd.docker.distribution.manifest.v2+json"
local auth = os.getenv("BENCH_AUTHORIZATION")
if auth ~= nil and auth ~= "" then
  wrk.headers["Authorization"] = auth
end
