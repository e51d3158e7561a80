"""Runs the pack inside a real ComfyUI (../shared/tools/comfyui) for the integration test and for by-hand checks.

    COMFYUI_DIR=~/comfyui-test/ComfyUI .venv/bin/python tests/comfyui_harness.py   # runs every example workflow

The server gets a temporary models folder holding the tiny random-weight models (reconx_core.testing), a temporary
input folder with two photos and a temporary output folder, through ComfyUI's own command-line options.

Environment: COMFYUI_DIR (a ComfyUI source tree), COMFYUI_VENV (its venv; default COMFYUI_DIR/../venv),
RECONX_COMFY_TOOLS (the shared/tools/comfyui folder; found by itself when the pack sits beside ../shared or when
RECONX_FIXTURES points at shared/fixtures), RECONX_COMFY_PORT (8189).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Callable, Optional

REPO = Path(__file__).resolve().parents[1]
TOOL_FILES = ("run_with_pack.sh", "run_workflow.py")
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from comfy_workflows import node_specs, ui_to_api  # noqa: E402

PORT = int(os.environ.get("RECONX_COMFY_PORT", "8189"))


def tool_folder_candidates() -> list[tuple[str, Path]]:
    """Where the ComfyUI tools may be, in the order they are tried, each with where the guess came from."""
    explicit = os.environ.get("RECONX_COMFY_TOOLS")
    if explicit:
        # An explicit setting is never second-guessed: a wrong one must be reported, not silently replaced.
        return [("RECONX_COMFY_TOOLS", Path(explicit).expanduser())]
    candidates = [("beside the repository", REPO.parent / "shared" / "tools" / "comfyui")]
    fixtures = os.environ.get("RECONX_FIXTURES")
    if fixtures:
        beside_fixtures = Path(fixtures).expanduser().parent / "tools" / "comfyui"
        candidates.append(("RECONX_FIXTURES/../tools/comfyui", beside_fixtures))
    return candidates


def find_tools() -> Path:
    """The folder holding run_with_pack.sh and run_workflow.py (shared/tools/comfyui).

    Tried in order: RECONX_COMFY_TOOLS, ../shared/tools/comfyui beside this repository,
    RECONX_FIXTURES/../tools/comfyui.
    Raises FileNotFoundError naming RECONX_COMFY_TOOLS and every folder looked in when none holds both files.
    """
    tried = []
    for origin, folder in tool_folder_candidates():
        if all((folder / f).is_file() for f in TOOL_FILES):
            return folder
        tried.append(f"{folder} ({origin})")
    raise FileNotFoundError(
        "the ComfyUI test tools (" + ", ".join(TOOL_FILES) + ") were not found in: " + "; ".join(tried)
        + ". Set RECONX_COMFY_TOOLS to the shared/tools/comfyui folder (the real-ComfyUI tests run because "
        "COMFYUI_DIR is set; unset COMFYUI_DIR to skip them).")


def check_comfy_dir(comfy_dir: Path, venv: Path) -> None:
    """Raise FileNotFoundError naming COMFYUI_DIR / COMFYUI_VENV when either does not look right."""
    if not (comfy_dir / "main.py").is_file():
        raise FileNotFoundError(f"COMFYUI_DIR={comfy_dir} has no main.py: point COMFYUI_DIR at a ComfyUI source tree "
                                "(set-up: shared/tools/comfyui/README.md)")
    if not (venv / "bin" / "python").is_file():
        raise FileNotFoundError(f"no Python venv at {venv}: create ComfyUI's venv there or set COMFYUI_VENV "
                                "(set-up: shared/tools/comfyui/README.md)")


def small_run_overrides(class_type: str, inputs: dict, names: dict) -> dict:
    """Make an example workflow cheap on a CPU and point it at the tiny models and the test photos."""
    inputs = dict(inputs)
    set_if = lambda key, value: inputs.__setitem__(key, value) if key in inputs else None  # noqa: E731
    if class_type == "LoadImage":
        inputs["image"] = names["photos"].pop(0) if names["photos"] else names["last_photo"]
    elif class_type == "ReconXDust3rLoader":
        inputs["ckpt_name"] = names["dust3r"]
    elif class_type == "ReconXVideoModelLoader":
        # a ViewCrafter template (its file name or backbone says so) gets the tiny ViewCrafter
        viewcrafter = "viewcrafter" in f"{inputs.get('ckpt_name', '')} {inputs.get('backbone', '')}".lower()
        inputs["ckpt_name"] = names["viewcrafter" if viewcrafter else "video"]
        if inputs.get("structure_name", "none") != "none":
            inputs["structure_name"] = names["structure_branch"]
    elif class_type == "ReconXDust3rAlign":
        set_if("iterations", 30)
        set_if("min_confidence", 1.0)  # random weights give confidences barely above 1
    elif class_type == "ReconXFitGaussians":
        set_if("steps", 30)
        set_if("lpips_weight", 0.0)  # no LPIPS backbone offline
        set_if("max_points", 5000)
    elif class_type == "ReconXInterpolate":
        set_if("steps", 2)
        set_if("frames", 4)
    elif class_type == "ReconXRenderGaussians":
        set_if("frames", 4)
    elif class_type == "ReconXEvaluateHeldOut":
        set_if("iterations", 30)
        set_if("lpips", "off")  # no LPIPS backbone offline
    return inputs


class ComfyServer:
    """A ComfyUI server with this pack, on 127.0.0.1:PORT, with temporary models/input/output folders."""

    def __init__(self, comfy_dir: Path, work: Path):
        self.comfy_dir = Path(comfy_dir)
        self.work = Path(work)
        self.venv = Path(os.environ.get("COMFYUI_VENV", self.comfy_dir.parent / "venv"))
        check_comfy_dir(self.comfy_dir, self.venv)
        self.tools = find_tools()
        self.models, self.input, self.output = (self.work / d for d in ("models", "input", "output"))
        self.state = self.work / "state"
        self.names = {}

    def env(self) -> dict:
        config = self.work / "extra_model_paths.yaml"
        config.write_text(f"reconx_test:\n  base_path: {self.models}\n  dust3r: dust3r\n  reconx: reconx\n")
        args = (f"--extra-model-paths-config {config} --input-directory {self.input} "
                f"--output-directory {self.output}")
        # TORCH_HOME: a torch hub folder of the server's own, so a backbone in the user's cache (LPIPS's AlexNet)
        # cannot hide a "file missing" row of the bad-input table.
        return dict(os.environ, COMFY_DIR=str(self.comfy_dir), VENV=str(self.venv), PORT=str(PORT),
                    STATE_DIR=str(self.state), COMFY_ARGS=args, PACK_MODE="symlink", WAIT_S="240",
                    TORCH_HOME=str(self.work / "torch_home"))

    def prepare(self) -> None:
        from PIL import Image
        from skimage.data import stereo_motorcycle

        from reconx_core.testing.tiny_models import write_tiny_models

        paths = write_tiny_models(self.models)
        self.names = {k: p.name for k, p in paths.items()}
        self.input.mkdir(parents=True, exist_ok=True)
        self.output.mkdir(parents=True, exist_ok=True)
        left, right, _ = stereo_motorcycle()
        for name, array in (("left.png", left), ("right.png", right), ("third.png", left[:, ::-1].copy())):
            Image.fromarray(array).resize((148, 100)).save(self.input / name)

    def unlink_other_copies(self) -> list[str]:
        """Remove links in custom_nodes to other copies of this pack (e.g. left by a run from another checkout).

        Two copies register the same node names, so ComfyUI credits them to whichever loaded last and the
        start-up check reports "0 node(s) registered" for the other; both also share one `reconx_core` on sys.path.
        """
        removed = []
        custom_nodes = self.comfy_dir / "custom_nodes"
        for entry in sorted(custom_nodes.iterdir()) if custom_nodes.is_dir() else []:
            if entry.name == REPO.name or not (entry / "reconx_core").is_dir():
                continue
            if not entry.is_symlink():
                raise RuntimeError(f"{entry} is another copy of this pack (not a link): remove it from custom_nodes, "
                                   "or both copies register the same nodes")
            entry.unlink()
            removed.append(entry.name)
        return removed

    def start(self) -> str:
        self.prepare()
        removed = self.unlink_other_copies()
        run = subprocess.run(["bash", str(self.tools / "run_with_pack.sh"), str(REPO)], env=self.env(),
                             capture_output=True, text=True, timeout=400)
        if run.returncode != 0:
            # run_with_pack.sh leaves a server running when it started but the pack failed to register: stop it,
            # or it holds the port and every later start refuses.
            self.stop()
            raise RuntimeError(f"ComfyUI did not start with the pack:\n{run.stdout}\n{run.stderr}")
        note = f"removed links to other copies of the pack: {removed}\n" if removed else ""
        return note + run.stdout

    def stop(self) -> None:
        subprocess.run(["bash", str(self.tools / "run_with_pack.sh"), "--stop"], env=self.env(), capture_output=True)

    def get(self, path: str):
        with urllib.request.urlopen(f"http://127.0.0.1:{PORT}{path}", timeout=30) as response:
            return json.loads(response.read())

    def post(self, path: str, data: Optional[dict] = None) -> int:
        request = urllib.request.Request(f"http://127.0.0.1:{PORT}{path}", method="POST",
                                         data=json.dumps(data or {}).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status

    def server_log(self) -> str:
        """Everything the server has printed so far (run_with_pack.sh writes it to STATE_DIR/server.log)."""
        log = self.state / "server.log"
        return log.read_text(errors="replace") if log.is_file() else ""

    def files_under(self, *folders: Path) -> set:
        """Every file below the given folders (default: output, models and ComfyUI's temp folder)."""
        folders = folders or (self.output, self.models, self.comfy_dir / "temp")
        return {str(p) for folder in folders if folder.is_dir() for p in folder.rglob("*") if p.is_file()}

    def run_example(self, name: str, timeout: int = 900, structure: bool = False,
                    overrides: Optional[dict] = None, edit: Optional[Callable[[dict], None]] = None,
                    label: str = "", interrupt_at: Optional[str] = None) -> dict:
        """Run example_workflows/NAME.json (made small); returns {"rc", "history", "log", "prompt"}.

        structure: un-bypass ReconX Encode Point Cloud and load the tiny structure branch (structure guidance).
        overrides: {class_type: {input: value}} set after the small-run settings (e.g. another guidance mode).
        edit: called with the API prompt {node_id: {"class_type", "inputs"}} last, to change it in place (drop a
        link, add a node). label: names the files this run writes in the work folder.
        interrupt_at: a class_type; the run is cancelled (POST /interrupt) when that node first reports progress.
        rc is run_workflow.py's: 0 success, 1 execution error, 2 rejected at queue time, 3 timeout, 4 interrupted.
        """
        workflow = json.loads((REPO / "example_workflows" / f"{name}.json").read_text())
        if structure:
            for node in workflow["nodes"]:
                if node["type"] == "ReconXEncodePointCloud":
                    node["mode"] = 0
                if node["type"] == "ReconXVideoModelLoader":
                    node["widgets_values"][1] = self.names["structure_branch"]
        specs = node_specs()
        names = dict(self.names, photos=["left.png", "right.png", "third.png"], last_photo="third.png")
        prompt = ui_to_api(workflow, specs)
        for node_id in sorted(prompt, key=int):
            node = prompt[node_id]
            node["inputs"] = small_run_overrides(node["class_type"], node["inputs"], names)
            node["inputs"].update((overrides or {}).get(node["class_type"], {}))
        if edit is not None:
            edit(prompt)
        name = name + ("_structure" if structure else "") + ("_overrides" if overrides else "") + label
        api_file = self.work / f"{name}.api.json"
        api_file.write_text(json.dumps(prompt, indent=1))
        history_file = self.work / f"{name}.history.json"
        command = [sys.executable, str(self.tools / "run_workflow.py"), str(api_file), "--server",
                   f"127.0.0.1:{PORT}", "--timeout", str(timeout), "--history-out", str(history_file)]
        if interrupt_at is None:
            run = subprocess.run(command, capture_output=True, text=True, timeout=timeout + 60)
            rc, log = run.returncode, run.stdout + run.stderr
        else:
            rc, log = self._run_and_interrupt(command, prompt, interrupt_at, timeout)
        history = json.loads(history_file.read_text()) if history_file.exists() else {}
        return {"rc": rc, "history": history, "log": log, "prompt": prompt}

    def _run_and_interrupt(self, command: list, prompt: dict, class_type: str, timeout: int) -> tuple:
        """Run `command` (run_workflow.py) and press Cancel (POST /interrupt) at the first progress report of the
        node of `class_type`, i.e. while it is inside its loop, as a user would. Returns (rc, log)."""
        node_id = next(k for k, v in prompt.items() if v["class_type"] == class_type)
        started = f"progress node {node_id}:"
        lines, interrupted = [], False
        with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as run:
            try:
                for line in run.stdout:   # run_workflow.py prints each websocket progress message as it comes
                    lines.append(line)
                    if not interrupted and line.strip().startswith(started):
                        self.post("/interrupt")
                        interrupted = True
                run.wait(timeout=timeout + 60)
            finally:
                if run.poll() is None:
                    run.kill()
        if not interrupted:
            lines.append(f"[harness] node {node_id} ({class_type}) never reported progress: nothing was interrupted\n")
        return run.returncode, "".join(lines)


def main() -> int:
    import tempfile

    comfy_dir = os.environ.get("COMFYUI_DIR")
    if not comfy_dir:
        print("set COMFYUI_DIR to a ComfyUI source tree and, unless this repository sits beside ../shared, "
              "RECONX_COMFY_TOOLS to shared/tools/comfyui (see shared/tools/comfyui/README.md)")
        return 2
    work = Path(tempfile.mkdtemp(prefix="reconx-comfy-"))
    server = ComfyServer(Path(comfy_dir), work)
    print(server.start())
    try:
        templates = server.get("/api/workflow_templates")
        print("templates:", {k: v for k, v in templates.items() if k == REPO.name})
        names = sys.argv[1:] or sorted(p.stem for p in (REPO / "example_workflows").glob("*.json"))
        failed = 0
        for name in names:
            result = server.run_example(name)
            print(f"== {name}: rc {result['rc']}\n{result['log'][-3000:]}")
            failed += result["rc"] != 0
        print("outputs:", sorted(str(p.relative_to(server.output)) for p in server.output.rglob("*") if p.is_file()))
        return 1 if failed else 0
    finally:
        server.stop()
        if os.environ.get("RECONX_KEEP") != "1":
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
