"""The rendered Kubernetes manifests keep the promises k8s/README.md makes.

kubernetes-validate, checkov and promtool (k8s/validate.sh) check schemas and generic good
practice; these tests check what is specific to Twofold: probes on the port the server really
listens on, metrics port = gRPC port + 1000, flags that reload in place, headless Services for
client-side balancing, selectors that match, every pod covered by NetworkPolicy and scraped.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml

from tests.k8s_support import (
    OVERLAYS,
    ROOT,
    Manifest,
    dashboard,
    dashboard_panels,
    find,
    one,
    render,
    workload,
    workloads,
)

SERVERS = {
    # Deployment name -> (subcommand, gRPC port); the ports are the documented defaults.
    "assignment-server": ("serve-assignment", 50051),
    "model-server": ("serve-model", 50052),
    "analysis-worker": ("serve-analysis", 50053),
}
HOT_PATH = ("assignment-server", "model-server")


def test_both_overlays_exist() -> None:
    assert {"dev", "prod"} <= set(OVERLAYS)


@pytest.fixture(params=OVERLAYS)
def docs(request: pytest.FixtureRequest) -> list[Manifest]:
    return render(request.param)


def _container(deployment: Manifest) -> dict[str, Any]:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def _port(container: dict[str, Any], name: str) -> int:
    (port,) = [p["containerPort"] for p in container["ports"] if p["name"] == name]
    return int(port)


def _arg(args: list[str], flag: str) -> str:
    assert flag in args, f"{flag} missing from {args}"
    return args[args.index(flag) + 1]


def _env(docs: list[Manifest], deployment: Manifest) -> dict[str, str]:
    """The container's environment as the kubelet builds it: envFrom ConfigMaps, then env."""
    container = _container(deployment)
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(one(docs, "ConfigMap", source["configMapRef"]["name"])["data"])
        else:
            env[f"<every key of secret {source['secretRef']['name']}>"] = "<secret>"
    for entry in container.get("env", []):
        source = entry.get("valueFrom", {})
        if "secretKeyRef" in source:
            env[entry["name"]] = f"<secret {source['secretKeyRef']['name']}/{source['secretKeyRef']['key']}>"
        elif "fieldRef" in source:
            env[entry["name"]] = f"<field {source['fieldRef']['fieldPath']}>"
        else:
            env[entry["name"]] = entry["value"]
    return env


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Label-selector semantics for matchLabels and the Exists/In matchExpressions we use."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        if expr["operator"] == "Exists" and expr["key"] not in labels:
            return False
        if expr["operator"] == "In" and labels.get(expr["key"]) not in expr["values"]:
            return False
    return True


def _pod_labels(deployment: Manifest) -> dict[str, str]:
    return deployment["spec"]["template"]["metadata"]["labels"]


def test_every_server_runs_its_documented_command(docs: list[Manifest]) -> None:
    deployments = {d["metadata"]["name"]: d for d in workloads(docs)}
    assert set(deployments) == set(SERVERS)
    assert {n for n, d in deployments.items() if d["kind"] == "StatefulSet"} == set(HOT_PATH)
    for name, (command, port) in SERVERS.items():
        container = _container(deployments[name])
        args = container["args"]
        assert args[0] == command
        assert int(_arg(args, "--port")) == port == _port(container, "grpc")
        assert "--lake" not in args  # from TWOFOLD_LAKE, which the lake component sets
        assert _env(docs, deployments[name])["TWOFOLD_LAKE"] in ("/var/lib/twofold/lake", "s3://twofold-lake/prod")
        # The metrics port follows the documented rule (gRPC port + 1000) and is declared.
        assert int(_env(docs, deployments[name])["TWOFOLD_METRICS_PORT"]) == port + 1000 == _port(container, "metrics")
    assert _arg(_container(deployments["model-server"])["args"], "--repository") == "/var/lib/twofold/models"
    assert int(_arg(_container(deployments["model-server"])["args"], "--workers")) >= 1
    assert _arg(_container(deployments["assignment-server"])["args"], "--flags") == "/etc/twofold/flags"
    assert re.fullmatch(r"\d+[smh]", _arg(_container(deployments["analysis-worker"])["args"], "--every"))


def test_probes_are_native_grpc_on_the_serving_port(docs: list[Manifest]) -> None:
    for deployment in workloads(docs):
        container = _container(deployment)
        grpc_port = _port(container, "grpc")
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            spec = container[probe]
            # Numeric port: a named port is not allowed for gRPC probes.
            assert spec["grpc"]["port"] == grpc_port, (deployment["metadata"]["name"], probe)
            assert set(spec) & {"httpGet", "tcpSocket", "exec"} == set()
        # The startup probe gives loading (flags, models) time before liveness may kill.
        startup = container["startupProbe"]
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 60


def test_pods_run_under_the_restricted_profile(docs: list[Manifest]) -> None:
    for deployment in workloads(docs):
        pod = deployment["spec"]["template"]["spec"]
        assert pod["automountServiceAccountToken"] is False
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] >= 10000
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        container = _container(deployment)
        sc = container["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"]["drop"] == ["ALL"] and "add" not in sc["capabilities"]
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(container["resources"][kind])
        # A read-only root needs somewhere to write: /tmp is an emptyDir with a size limit.
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes[mounts["/tmp"]]["emptyDir"]["sizeLimit"]
    for namespace in find(docs, "Namespace"):
        assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def test_drain_fits_in_the_termination_grace_period(docs: list[Manifest]) -> None:
    for deployment in workloads(docs):
        env = _env(docs, deployment)
        container = _container(deployment)
        pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", ["sleep", "0"])
        assert pre_stop[0] == "sleep"
        needed = float(pre_stop[1]) + float(env["TWOFOLD_GRACE_SECONDS"])
        assert needed < deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]


def test_servers_close_old_connections_so_clients_rebalance(docs: list[Manifest]) -> None:
    for name in HOT_PATH:
        env = _env(docs, workload(docs, name))
        assert 0 < float(env["TWOFOLD_MAX_CONNECTION_AGE_SECONDS"]) <= 600


def test_hot_path_services_are_headless_and_select_their_pods(docs: list[Manifest]) -> None:
    for service in find(docs, "Service"):
        name = service["metadata"]["name"]
        deployment = workload(docs, name)
        assert service["spec"]["selector"].items() <= _pod_labels(deployment).items()
        container = _container(deployment)
        # Every named container port is reachable through the Service (grpc, metrics, and the
        # analysis worker's results web UI), on the same number.
        assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == {
            p["name"]: p["containerPort"] for p in container["ports"]}
        assert {"grpc", "metrics"} <= {p["name"] for p in container["ports"]}
        if name in HOT_PATH:
            assert service["spec"]["clusterIP"] == "None", f"{name} must be headless for client-side round-robin"


def test_autoscalers_and_disruption_budgets_target_the_hot_path(
        docs: list[Manifest], request: pytest.FixtureRequest) -> None:
    hpas = {h["metadata"]["name"]: h for h in find(docs, "HorizontalPodAutoscaler")}
    pdbs = {p["metadata"]["name"]: p for p in find(docs, "PodDisruptionBudget")}
    assert set(hpas) == set(pdbs) == set(HOT_PATH)
    for name in HOT_PATH:
        deployment = workload(docs, name)
        hpa = hpas[name]
        assert hpa["apiVersion"] == "autoscaling/v2"
        assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": deployment["kind"], "name": name}
        assert 1 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
        # The autoscaler owns the replica count; a fixed one would be reset on every apply.
        assert "replicas" not in deployment["spec"]
        assert _selects(pdbs[name]["spec"]["selector"], _pod_labels(deployment))
        # Never a budget that blocks every node drain.
        assert pdbs[name]["spec"].get("maxUnavailable", 0) >= 1 or \
            pdbs[name]["spec"]["minAvailable"] < hpa["spec"]["minReplicas"]
    if "prod" in request.node.name:
        assert all(h["spec"]["minReplicas"] >= 3 for h in hpas.values())


def test_flags_reload_in_place_and_settings_roll_the_pods(docs: list[Manifest]) -> None:
    deployment = workload(docs, "assignment-server")
    pod = deployment["spec"]["template"]["spec"]
    (flags_volume,) = [v for v in pod["volumes"]
                       if "configMap" in v and v["configMap"]["name"].startswith("twofold-flags")]
    # A stable name (no content hash): editing the ConfigMap updates the mounted files in place.
    assert flags_volume["configMap"]["name"] == "twofold-flags"
    one(docs, "ConfigMap", "twofold-flags")
    (mount,) = [m for m in _container(deployment)["volumeMounts"] if m["name"] == flags_volume["name"]]
    # subPath mounts never see ConfigMap updates.
    assert "subPath" not in mount and mount["readOnly"] is True
    assert mount["mountPath"] == "/etc/twofold/flags"
    # Settings are read once at start: their ConfigMap name carries a content hash, so a change
    # is a new name and rolls every Deployment.
    for d in workloads(docs):
        (ref,) = [s["configMapRef"]["name"] for s in _container(d)["envFrom"] if "configMapRef" in s]
        assert re.fullmatch(r"twofold-settings-[a-z0-9]{10}", ref)


def test_volumes_are_bound_to_claims(docs: list[Manifest]) -> None:
    claims = {c["metadata"]["name"] for c in find(docs, "PersistentVolumeClaim")}
    for deployment in workloads(docs):
        pod = deployment["spec"]["template"]["spec"]
        for volume in pod["volumes"]:
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims
            if "configMap" in volume:
                one(docs, "ConfigMap", volume["configMap"]["name"])
    model = workload(docs, "model-server")
    mounts = {m["mountPath"]: m for m in _container(model)["volumeMounts"]}
    assert mounts["/var/lib/twofold/models"].get("readOnly") is True


def test_network_policies_cover_every_pod(docs: list[Manifest]) -> None:
    policies = find(docs, "NetworkPolicy")
    for deployment in workloads(docs):
        labels = _pod_labels(deployment)
        selecting = [p for p in policies if _selects(p["spec"]["podSelector"], labels)]
        types = {t for p in selecting for t in p["spec"]["policyTypes"]}
        assert types == {"Ingress", "Egress"}, deployment["metadata"]["name"]
        open_ports = {port["port"] for p in selecting for rule in p["spec"].get("ingress", [])
                      for port in rule.get("ports", [])}
        container = _container(deployment)
        # Named ports in the policies resolve to ports the container declares; the analysis
        # worker also opens its results web UI.
        expected = {"grpc", "metrics", "http"} if deployment["metadata"]["name"] == "analysis-worker" \
            else {"grpc", "metrics"}
        assert open_ports == expected and {p["name"] for p in container["ports"]} >= open_ports


def test_service_monitor_scrapes_every_server(docs: list[Manifest]) -> None:
    (monitor,) = find(docs, "ServiceMonitor")
    services = find(docs, "Service")
    scraped = [s for s in services if _selects(monitor["spec"]["selector"], s["metadata"]["labels"])]
    assert {s["metadata"]["name"] for s in scraped} == set(SERVERS)
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics"
    assert all(endpoint["port"] in {p["name"] for p in s["spec"]["ports"]} for s in scraped)


def test_grafana_dashboard_is_well_formed(docs: list[Manifest]) -> None:
    cm = one(docs, "ConfigMap", "twofold-grafana-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    board = dashboard(docs)
    panels = dashboard_panels(board)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    assert {v["name"] for v in board["templating"]["list"]} >= {"datasource", "namespace"}
    for panel in panels:
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, panel["title"]
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
            # Every query is scoped to the chosen namespace.
            assert 'namespace="$namespace"' in target["expr"], panel["title"]
    # Panels do not overlap.
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        g = panel["gridPos"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & mine, f"panel {panel['title']!r} overlaps another"
        cells |= mine


def _checkov_skips(deployment: Manifest) -> dict[str, str]:
    """check id -> reason, from `checkov.io/skipN: CHECK=reason` annotations."""
    annotations = deployment["metadata"].get("annotations", {})
    return dict(v.split("=", 1) for k, v in annotations.items() if k.startswith("checkov.io/skip"))


def test_checkov_skips_are_few_and_give_their_reason() -> None:
    for overlay in OVERLAYS:
        for deployment in workloads(render(overlay)):
            skips = _checkov_skips(deployment)
            assert all(len(reason) > 30 for reason in skips.values()), skips
            # The one base skip: client secrets reach the assignment server as env (secret_env).
            expected = {"CKV_K8S_35"} if deployment["metadata"]["name"] == "assignment-server" else set()
            if overlay == "dev":
                expected.add("CKV_K8S_15")
            assert set(skips) == expected, (overlay, deployment["metadata"]["name"], skips)
            pull = _container(deployment)["imagePullPolicy"]
            assert pull == ("IfNotPresent" if overlay == "dev" else "Always")


def test_secrets_stay_out_of_git_and_are_required() -> None:
    """Resolve tokens must open on every replica, so the key is shared, from a Secret that the
    operator creates (none is rendered); a missing Secret stops the pod instead of serving
    with a generated key."""
    for overlay in OVERLAYS:
        docs = render(overlay)
        assert find(docs, "Secret") == []
        deployment = workload(docs, "assignment-server")
        pod = deployment["spec"]["template"]["spec"]
        (volume,) = [v for v in pod["volumes"] if "secret" in v and v["secret"]["secretName"] == "twofold-assignment"]
        assert volume["secret"]["secretName"] == "twofold-assignment" and not volume["secret"].get("optional")
        env = _env(docs, deployment)
        (mount,) = [m for m in _container(deployment)["volumeMounts"] if m["name"] == volume["name"]]
        (item,) = [i for i in volume["secret"]["items"] if i["key"] == "token-key"]
        assert env["TWOFOLD_TOKEN_KEY_FILE"] == f"{mount['mountPath']}/{item['path']}"
        # The flags' client document names the variable the Secret fills.
        clients = yaml.safe_load(one(docs, "ConfigMap", "twofold-flags")["data"]["clients.yaml"])
        for secret in clients["secrets"]:
            assert env[secret["secret_env"]] == "<secret twofold-assignment/client-secret-backend>"


def _dockerfile_stages() -> dict[str, list[str]]:
    """Stage name -> its instructions (continuation lines joined), from the repository's Dockerfile."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    stages: dict[str, list[str]] = {}
    current: list[str] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            name = line.split()[-1] if " AS " in line.upper() else f"stage{len(stages)}"
            current = stages.setdefault(name, [])
        current.append(line)
    return stages


def test_image_and_manifests_agree() -> None:
    stages = _dockerfile_stages()
    serve = list(stages.values())[-1]
    assert list(stages)[-1] == "serve", "the serving image must be the default (last) target"
    assert re.fullmatch(r"FROM python:3\.1[1-9][.\d]*-slim-\w+ AS serve", serve[0])
    # The serving stage installs nothing itself: it copies the build stage's virtualenv, whose
    # `pip install .` has no extras (XGBoost is the `train` extra).
    assert not any(i.startswith("RUN") and "pip" in i for i in serve)
    assert "COPY --from=build /opt/twofold /opt/twofold" in serve
    installs = [i for i in stages["build"] if "pip install" in i]
    assert len(installs) == 1 and re.search(r"pip install --no-compile \. ", installs[0] + " ")
    assert 'ENTRYPOINT ["twofold"]' in serve
    (user,) = [i.split()[1] for i in serve if i.startswith("USER ")]
    uid, gid = (int(x) for x in user.split(":"))
    exposed = {int(p) for i in serve if i.startswith("EXPOSE ") for p in i.split()[1:]}
    for overlay in OVERLAYS:
        for deployment in workloads(render(overlay)):
            pod = deployment["spec"]["template"]["spec"]
            assert (pod["securityContext"]["runAsUser"], pod["securityContext"]["runAsGroup"]) == (uid, gid)
            container = _container(deployment)
            assert "command" not in container, "the image's ENTRYPOINT (twofold) runs the subcommand in args"
            assert {p["containerPort"] for p in container["ports"]} <= exposed


def test_lake_writers_own_their_log_on_their_own_volume(docs: list[Manifest]) -> None:
    """Each writer pod's name is its writer id and its write-ahead log sits on a claim of its own
    (volumeClaimTemplates), kept on scale-down, so no lock has to be coherent across nodes."""
    for name in HOT_PATH:
        sts = workload(docs, name)
        assert sts["kind"] == "StatefulSet" and sts["spec"]["serviceName"] == name
        env = _env(docs, sts)
        assert env["TWOFOLD_WRITER_ID"] == "<field metadata.name>"
        (template,) = sts["spec"]["volumeClaimTemplates"]
        assert template["spec"]["accessModes"] == ["ReadWriteOnce"]
        mounts = {m["name"]: m["mountPath"] for m in _container(sts)["volumeMounts"]}
        assert env["TWOFOLD_WAL_DIR"] == mounts[template["metadata"]["name"]]
        assert sts["spec"]["persistentVolumeClaimRetentionPolicy"]["whenScaled"] == "Retain"


def _pod_spec(manifest: Manifest) -> dict[str, Any]:
    if manifest["kind"] == "CronJob":
        return manifest["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return manifest["spec"]["template"]["spec"]


def test_the_lake_is_a_volume_in_dev_and_object_storage_in_prod(
        docs: list[Manifest], request: pytest.FixtureRequest) -> None:
    prod = request.node.callspec.params["docs"] != "dev"  # prod and the overlays built on it (spark)
    users = [*workloads(docs), one(docs, "CronJob", "lake-compactor")]
    claims = {c["metadata"]["name"] for c in find(docs, "PersistentVolumeClaim")}
    for manifest in users:
        (container,) = _pod_spec(manifest)["containers"]
        settings = {k: v for s in container["envFrom"] if "configMapRef" in s
                    for k, v in one(docs, "ConfigMap", s["configMapRef"]["name"])["data"].items()}
        assert not [s for s in container["envFrom"] if "secretRef" in s]  # keys never as env (checkov)
        volumes = _pod_spec(manifest).get("volumes", [])
        claimed = {v["persistentVolumeClaim"]["claimName"] for v in volumes if "persistentVolumeClaim" in v}
        secret_volumes = {v["name"]: v["secret"] for v in volumes if "secret" in v}
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        if prod:
            assert settings["TWOFOLD_LAKE"].startswith("s3://") and settings["AWS_REGION"]
            # The keys as an AWS shared-credentials file from the Secret, required.
            folder, _, file = env["AWS_SHARED_CREDENTIALS_FILE"].rpartition("/")
            secret = secret_volumes[mounts[folder]]
            assert secret["secretName"] == "twofold-lake-credentials" and not secret.get("optional")
            assert [i["path"] for i in secret["items"]] == [file]
            assert "twofold-lake" not in claimed | claims
        else:
            assert settings["TWOFOLD_LAKE"] == "/var/lib/twofold/lake" and "AWS_SHARED_CREDENTIALS_FILE" not in env
            assert "twofold-lake" in claimed and "/var/lib/twofold/lake" in mounts
    if prod:
        policy = one(docs, "NetworkPolicy", "twofold-allow-lake-egress")
        assert {p["port"] for rule in policy["spec"]["egress"] for p in rule["ports"]} == {443}


def test_compaction_runs_as_a_cron_job(docs: list[Manifest]) -> None:
    job = one(docs, "CronJob", "lake-compactor")
    assert job["spec"]["concurrencyPolicy"] == "Forbid"
    (container,) = _pod_spec(job)["containers"]
    assert container["args"][:2] == ["lake", "compact"] and _arg(container["args"], "--older-than") == "1h"
    pod = _pod_spec(job)
    assert pod["securityContext"]["runAsNonRoot"] is True and container["securityContext"]["readOnlyRootFilesystem"]


def test_prod_keeps_sticky_assignments_in_redis_from_a_secret() -> None:
    """Every prod replica reads and writes one Redis (URL and password from the Secret
    twofold-redis, never rendered) and may reach it; dev keeps the per-pod SQLite file."""
    for overlay in OVERLAYS:
        docs = render(overlay)
        deployment = workload(docs, "assignment-server")
        args, env = _container(deployment)["args"], _env(docs, deployment)
        base_args = _container(workload(render("dev"), "assignment-server"))["args"]
        if overlay != "dev":  # prod and the overlays built on it (spark)
            assert "--materializations" not in args  # a flag would override the environment
            assert args == [a for i, a in enumerate(base_args) if "--materializations" not in base_args[i - 1:i + 1]]
            assert env["TWOFOLD_MATERIALIZATIONS"] == "<secret twofold-redis/url>"
            assert env["TWOFOLD_MATERIALIZATIONS_PASSWORD"] == "<secret twofold-redis/password>"
            labels = _pod_labels(deployment)
            egress = {port["port"] for p in find(docs, "NetworkPolicy") if _selects(p["spec"]["podSelector"], labels)
                      for rule in p["spec"].get("egress", []) for port in rule.get("ports", [])}
            assert {6379, 6380} <= egress
        else:
            assert _arg(args, "--materializations").endswith(".sqlite")
            assert "TWOFOLD_MATERIALIZATIONS" not in env


def test_the_analysis_workers_results_web_ui_is_exposed_and_allowed_in(docs: list[Manifest]) -> None:
    deployment = one(docs, "Deployment", "analysis-worker")
    port = _port(_container(deployment), "http")
    assert _env(docs, deployment)["TWOFOLD_HTTP_PORT"] == str(port)
    service = one(docs, "Service", "analysis-worker")
    assert {"name": "http", "port": port}.items() <= next(
        p for p in service["spec"]["ports"] if p["name"] == "http").items()
    policy = one(docs, "NetworkPolicy", "twofold-allow-results-viewers")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= _pod_labels(deployment).items()
    assert policy["spec"]["ingress"][0]["ports"] == [{"protocol": "TCP", "port": "http"}]
