"""An Outpost update handler in Python: `py-light` devices that run the Outpost agent.

Built with componentize-py against wit/outpost-handler-0.1.0 (world `update-handler`):

    componentize-py -d ../../../wit/outpost-handler-0.1.0 -w update-handler \
        componentize app -o python_example.wasm

It speaks the agent's esp_https_ota-style protocol (docs/device-agent.md) as the Rust
esp32-app handler does: `ota-begin` with a signed download link, `ota-apply`,
`ota-cancel`, `ota-rollback`, and the device's `progress`/`done`/`failed` reports. It
checks nothing inside the image: a vendor adds its own format checks in `download`.
"""

import json

from componentize_py_types import Err
from wit_world import exports
from wit_world.imports import device_channel, log
from wit_world.imports.types import (
    DeviceReport,
    HandlerInfo,
    Limits,
    Outcome,
    ReportVerdict_Finished,
    ReportVerdict_Ignored,
    ReportVerdict_InProgress,
)

NAME = "python-example"
VERSION = "1.0.0"
DEVICE_TYPES = ["py-light"]
# How long the device gets to answer a command, in milliseconds.
DEVICE_TIMEOUT_MS = 10_000


def code(value: int) -> int:
    """An extended result code of this handler: facility 1 (vendor), component 0x50."""
    return (1 << 28) | (0x50 << 20) | value


NO_FILE = code(1)
REFUSED = code(2)
WRONG_VERSION = code(3)
DEVICE_FAILED = code(4)
ROLLBACK_REFUSED = code(5)


def success(result_code: int, details: str) -> Outcome:
    return Outcome(result_code=result_code, extended_code=0, details=details)


def failure(extended: int, details: str) -> Outcome:
    return Outcome(result_code=0, extended_code=extended, details=details)


def request(command: str, payload: bytes) -> bytes:
    """Sends a command to the device; raises Err(ChannelError) when it fails."""
    return device_channel.request(command, payload, DEVICE_TIMEOUT_MS)


def describe_error(err: Err) -> str:
    """A channel error as text (its variant's name, and its reason when it has one)."""
    value = err.value
    reason = getattr(value, "value", None)
    name = type(value).__name__.split("_")[-1]
    return f"{name}: {reason}" if reason else name


class Handler(exports.Handler):
    def describe(self) -> HandlerInfo:
        # CPython needs more memory and CPU per call than a Rust guest.
        return HandlerInfo(
            name=NAME,
            version=VERSION,
            device_types=DEVICE_TYPES,
            requested_limits=Limits(memory_mib=64, cpu_ms=1_000),
        )

    def is_installed(self, device, update) -> Outcome:
        if device.firmware_version == update.version:
            return success(900, f"{update.version} is installed")
        running = device.firmware_version or "an unknown version"
        return success(901, f"{update.version} is not installed (device runs {running})")

    def download(self, device, update) -> Outcome:
        if not update.files:
            return failure(NO_FILE, "the update has no files")
        image = update.files[0]
        try:
            url = device_channel.download_url(image.file_id)
        except Err as err:
            return failure(REFUSED, f"no download URL: {describe_error(err)}")
        begin = json.dumps(
            {"url": url, "size": image.size, "sha256": image.file_id, "version": update.version}
        )
        try:
            request("ota-begin", begin.encode())
        except Err as err:
            return failure(REFUSED, f"ota-begin refused: {describe_error(err)}")
        log.write(log.Level.INFO, "device is downloading", [("version", update.version)])
        return success(501, f"device is downloading {update.version}")

    def install(self, device, update) -> Outcome:
        return success(600, "written to the passive slot while downloading")

    def apply(self, device, update) -> Outcome:
        try:
            request("ota-apply", update.version.encode())
        except Err as err:
            return failure(REFUSED, f"ota-apply refused: {describe_error(err)}")
        return success(700, f"device is rebooting into {update.version}")

    def cancel(self, device, update) -> Outcome:
        try:
            request("ota-cancel", b"")
        except Err as err:
            return success(801, f"unable to cancel: {describe_error(err)}")
        return success(800, "download aborted")

    def rollback(self, device, update) -> Outcome:
        try:
            answer = request("ota-rollback", b"")
        except Err as err:
            return failure(ROLLBACK_REFUSED, f"ota-rollback refused: {describe_error(err)}")
        running = answer.decode("utf-8", "replace").strip()
        return success(1100, f"device runs {running} again")

    def interpret_report(self, device, update, report: DeviceReport):
        text = bytes(report.payload).decode("utf-8", "replace").strip()
        if report.kind == "progress":
            # ASCII digits only ("²".isdigit() is true, and int() would raise).
            percent = int(text) if text.isascii() and text.isdecimal() and len(text) <= 3 else None
            if percent is not None and percent > 100:
                percent = None
            return ReportVerdict_InProgress(percent)
        if report.kind == "done" and text == update.version:
            return ReportVerdict_Finished(success(700, f"device runs {text}"))
        if report.kind == "done":
            return ReportVerdict_Finished(
                failure(WRONG_VERSION, f"device runs {text}, expected {update.version}")
            )
        if report.kind == "failed":
            return ReportVerdict_Finished(failure(DEVICE_FAILED, f"device failed: {text}"))
        return ReportVerdict_Ignored()
