"""Security mutants: `make mutants` breaks one security-critical line at a time and
checks that the test suite notices.

Each entry is one minimal edit of one snippet that must occur exactly once in its
file (when the code moves, the run fails and says so: update the entry).  `tests`
is the fastest subset expected to kill it; when it does not, the whole suite runs
before the mutant is reported SURVIVED.  Adding a property is adding one dict.

Run: `make mutants` (or `.venv/bin/python tests/mutants.py [ID ...]`).  Not collected
by pytest; tests/test_mutants_list.py checks this list is well-formed and current.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORE = ["tests/test_core.py"]
IDENTITY = "tests/test_identity.py::"
HOSTILE = "tests/test_hostile.py::"
TEXT = "tests/test_e2e_text.py::"
TERMINAL = "tests/test_client_terminal.py"
CORE_T = "tests/test_core.py::"
RESOURCES = "tests/test_resources.py::"
SAFETY = "tests/test_local_safety.py::"
METADATA = "tests/test_metadata.py::"

# Visit.serve from the end of the handshake to the release of the slot (slot-after-threads)
SERVE_TAIL = """\
                self.end_handshake()
            if result is not None:
                self.run_session(*result)
        except Exception as e:  # a bad peer must never take the server down
            srv.log(f"connection from {self.peer} closed: internal error: {e!r}")
        finally:
            session.shut_down(sock)
            sock.close()
            # the slot is free only now: run_session returned once the session's threads ended
            srv.admission.release_slot()
"""

MUTANTS: list[dict] = [
    # --- the 15 of issue 14's mutation run --------------------------------------------------
    dict(id="record-mac", file="crypt.py", property="3.4 record MAC verified first",
         original="if not hmac.compare_digest(mac.digest(), tag) or iv != expected_iv:",
         replacement="if iv != expected_iv:", tests=CORE),
    dict(id="record-sequence", file="crypt.py", property="3.4 replay/reorder (sequence number)",
         original="        self.seq += 1\n", replacement="        self.seq += 0\n", tests=CORE),
    dict(id="ecdsa-signature", file="crypt.py", property="3.2 both signatures (ECDSA)",
         original="ecdsa_key.verify(encode_dss_signature(r, s),",
         replacement="(lambda *a: None)(encode_dss_signature(r, s),", tests=CORE),
    dict(id="mldsa-signature", file="crypt.py", property="3.2 both signatures (ML-DSA-65)",
         original="mldsa_key.verify(sigs.mldsa, transcript_hash, context)",
         replacement="mldsa_key.public_bytes_raw()", tests=CORE),
    dict(id="role-context", file="crypt.py", property="3.2/3.5 signatures bound to the role",
         original='Role.CLIENT: b"QSocket2 v2 client signature",',
         replacement='Role.CLIENT: b"QSocket2 v2 server signature",', tests=CORE),
    dict(id="transcript", file="crypt.py", property="3.5 everything into the transcript",
         original="        self._h.update(message)\n", replacement="        pass\n", tests=CORE),
    dict(id="key-schedule-transcript", file="crypt.py",
         property="3.1 keys bound to the transcript hash",
         original="HKDF.extract(hashes.SHA256(), transcript_hash, ecdh_secret + mlkem_secret)",
         replacement="HKDF.extract(hashes.SHA256(), bytes(32), ecdh_secret + mlkem_secret)",
         tests=CORE),
    dict(id="finished-mac", file="crypt.py", property="3.4 key confirmation (Finished MACs)",
         original="    if not hmac.compare_digest(finished_mac(key, transcript_hash), received):",
         replacement="    if False:", tests=CORE),
    dict(id="name-basename", file="transfer.py", property="3.8 peer names: no path components",
         original='name = name.replace("\\\\", "/").rsplit("/", 1)[-1]',
         replacement='name = name.replace("\\\\", "/")', tests=["tests/test_transfer.py"]),
    dict(id="no-overwrite", file="transfer.py", property="3.8 existing files never overwritten",
         original="os.link(self.temp, target)",
         replacement="os.replace(self.temp, target)",
         tests=["tests/test_transfer.py"]),
    dict(id="frame-limit", file="protocol.py", property="3.7 frames have a maximum size",
         original="    if length == 0 or length > limit:", replacement="    if length == 0:",
         tests=["tests/test_parsers_fuzz.py::test_read_frame_refuses_a_bad_length_before_any_data",
                "tests/test_parsers_fuzz.py::test_frame_length"]),
    dict(id="authorized-empty", file="server.py", property="3.3 --authorized-clients admits "
         "only those listed (an empty list admits no one)",
         original="if srv.authorized is not None and fp not in srv.authorized:",
         replacement="if srv.authorized and fp not in srv.authorized:",
         tests=[IDENTITY + "test_an_authorized_clients_file_listing_nobody_refuses_everyone"]),
    dict(id="pin-prefix", file="client_data.py", property="3.3 a changed key is refused "
         "(the whole fingerprint compared)",
         original="    if expected == offered:",
         replacement="    if expected[:16] == offered[:16]:",
         tests=["tests/test_core.py::test_a_fingerprint_differing_only_slightly_from_the_pin_is_changed",
                IDENTITY + "test_a_pin_that_differs_only_slightly_is_a_changed_key_end_to_end"]),
    dict(id="client-neutralise-text", file="client.py",
         property="3.9 the client's terminal is safe (server texts)",
         original='self.out(f"[server] {neutralise(text)}")',
         replacement='self.out(f"[server] {text}")',
         tests=[TERMINAL]),
    dict(id="liboqs-fips203-check", file="crypt.py",
         property="3.1 FIPS 203 encapsulation-key check (liboqs provider)",
         original="mlkem_public_key(ek)  # liboqs does not run",
         replacement="pass  # liboqs does not run", tests=CORE),
    dict(id="compressed-point", file="crypt.py",
         property="3.1 a P-256 share is a 65-byte uncompressed point",
         original="    if len(point) != P256_POINT or point[0] != 0x04:",
         replacement="    if False:",
         tests=CORE),
    # --- one per DESIGN.md section 3 property the code has today ------------------------------
    dict(id="pin-case", file="client_data.py", property="3.3 a changed key is refused "
         "(fingerprints are case-sensitive base64)",
         original="    if expected == offered:",
         replacement="    if expected.lower() == offered.lower():",
         tests=["tests/test_core.py::test_a_fingerprint_differing_only_slightly_from_the_pin_is_changed",
                IDENTITY + "test_a_pin_that_differs_only_slightly_is_a_changed_key_end_to_end"]),
    dict(id="ephemeral-ecdh", file="crypt.py", property="3.1 fresh ephemeral ECDH key per session",
         original="        key = ec.generate_private_key(ec.SECP256R1())",
         replacement="        key = ec.derive_private_key(7, ec.SECP256R1())", tests=CORE),
    dict(id="ephemeral-mlkem", file="crypt.py",
         property="3.1 fresh ephemeral ML-KEM key per session",
         original="            key = mlkem.MLKEM1024PrivateKey.generate()",
         replacement="            key = mlkem.MLKEM1024PrivateKey.from_seed_bytes(bytes(64))",
         tests=CORE),
    dict(id="keys-per-direction", file="crypt.py", property="3.4 separate keys per direction",
         original='c2s, s2c = expand("c2s traffic"), expand("s2c traffic")',
         replacement='c2s, s2c = expand("c2s traffic"), expand("c2s traffic")', tests=CORE),
    dict(id="record-direction", file="crypt.py",
         property="3.4 the MAC covers the direction",
         original="mac.update(_MAC_HEADER.pack(self._direction, seq))",
         replacement="mac.update(_MAC_HEADER.pack(DIRECTION_C2S, seq))", tests=CORE),
    dict(id="hybrid-mlkem-secret", file="crypt.py",
         property="3.1 hybrid: keys need the ML-KEM secret",
         original="ecdh_secret + mlkem_secret)",
         replacement="ecdh_secret + bytes(32))", tests=CORE),
    dict(id="hybrid-ecdh-secret", file="crypt.py", property="3.1 hybrid: keys need the ECDH secret",
         original="prk = HKDF.extract(hashes.SHA256(), transcript_hash, ecdh_secret",
         replacement="prk = HKDF.extract(hashes.SHA256(), transcript_hash, bytes(32)", tests=CORE),
    dict(id="fips203-vector-path", file="server_data.py",
         property="3.1 FIPS 203 check by the server core whatever its KEM provider "
                  "(a fixed one too: the test vector)",
         original="        crypt.mlkem_public_key(hello.mlkem_ek)\n",
         replacement="        pass\n",
         tests=CORE),
    dict(id="mlkem-ciphertext-length", file="crypt.py",
         property="3.1 an ML-KEM ciphertext of the wrong length is refused",
         original='    raise RemoteProtocolError("ML-KEM ciphertext has the wrong length")\n'
                  "        return private.decapsulate(ct)",
         replacement="    pass\n        return private.decapsulate(ct)", tests=CORE),
    dict(id="tofu-non-interactive", file="client.py",
         property="3.3 first contact without a flag is refused non-interactively",
         original="    if expected is None and not args.accept_new_host:",
         replacement="    if False:",
         tests=[TEXT + "test_unknown_host_in_batch_mode_is_refused_and_nothing_delivered"]),
    dict(id="changed-key-refused", file="client.py", property="3.3 a changed key is refused loudly",
         original="    if result.trust is Trust.CHANGED:", replacement="    if False:",
         tests=[TEXT + "test_changed_server_identity_is_refused_with_both_fingerprints"]),
    dict(id="fingerprint-flag-checked", file="client.py",
         property="3.3 --fingerprint is checked even when a pin exists",
         original="    if expected is not None and expected != offered:",
         replacement="    if False:",
         tests=[IDENTITY + "test_fingerprint_flag_is_checked_even_when_the_host_is_pinned"]),
    dict(id="known-hosts-per-port", file="client_data.py",
         property="3.3 pins are per host:port",
         original='    return f"[{host}]:{port}"', replacement='    return f"[{host}]"',
         tests=[IDENTITY + "test_fingerprint_flag_pins_and_wrong_fingerprint_is_refused",
                "tests/test_protocol_vector.py"]),
    dict(id="version-refused", file="protocol.py",
         property="3.5 another version is refused, never downgraded",
         original="    if version != VERSION:\n", replacement="    if False:\n", tests=CORE),
    dict(id="version-in-transcript", file="crypt.py",
         property="3.5 protocol label and version in the transcript",
         original="self._h = hashlib.sha256(PROTOCOL_LABEL)",
         replacement="self._h = hashlib.sha256()",
         tests=["tests/test_protocol_vector.py"]),
    dict(id="key-file-0600", file="keystore.py",
         property="3.6 a private key readable by others is refused",
         original="    if st.st_mode & 0o077:", replacement="    if st.st_mode & 0o000:",
         tests=[IDENTITY + "test_private_key_readable_by_others_is_refused"]),
    dict(id="handshake-timeout", file="server.py", property="3.7 handshakes have a timeout",
         original="deadline = time.monotonic() + srv.args.handshake_timeout",
         replacement="deadline = None",
         tests=[HOSTILE + "test_slow_and_idle_connections_time_out_while_a_client_is_served"]),
    dict(id="max-clients", file="server.py", property="3.7 the number of connections is capped",
         original="        return self.slots.acquire(blocking=False)",
         replacement="        return self.slots.acquire(blocking=True)",
         tests=[HOSTILE + "test_max_clients_exceeded_gets_a_busy_refusal"]),
    dict(id="file-sha256", file="transfer.py",
         property="3.8 a received file appears only if its SHA-256 matches",
         original="        if digest != sender_sha256:", replacement="        if False:",
         tests=["tests/test_transfer.py"]),
    dict(id="temp-removed", file="transfer.py", property="3.8 temporary file removed on failure",
         original="                os.unlink(self.temp)", replacement="                pass",
         tests=["tests/test_transfer.py"]),
    dict(id="server-neutralise-text", file="session.py",
         property="3.9 the server's terminal is safe (client texts)",
         original='self.out(f"[{conn.label}] {neutralise(text)}")',
         replacement='self.out(f"[{conn.label}] {text}")',
         tests=[HOSTILE + "test_escape_sequences_in_text_and_file_name_are_neutralised"]),
    dict(id="neutralise-function", file="protocol.py",
         property="3.9 neutralise() escapes controls, ESC and bidi",
         original='        if ch == "\\t" or unicodedata.category(ch) not in _UNSAFE:',
         replacement="        if True:",
         tests=["tests/test_parsers_fuzz.py::test_neutralise_leaves_no_control_or_format_characters"]),
    dict(id="client-neutralise-refusal", file="client.py",
         property="3.9 the client's terminal is safe (refusal reasons)",
         original='f"server refused this client: {neutralise(welcome.detail)}"',
         replacement='f"server refused this client: {welcome.detail}"', tests=[TERMINAL]),
    dict(id="client-neutralise-alert", file="client.py",
         property="3.9 the client's terminal is safe (plaintext alerts)",
         original='f"server refused the connection: {ALERT_MEANING[e.alert.code]}"',
         replacement='f"server refused the connection: {e.alert.reason}"', tests=[TERMINAL]),
    dict(id="keylog-off-by-default", file="session.py",
         property="3.10 the key log is off by default",
         original="    path = os.environ.get(KEYLOG_ENV)\n",
         replacement='    path = os.environ.get(KEYLOG_ENV) or "qsocket-keys.log"\n',
         tests=[TEXT + "test_batch_text_delivered_and_printed_by_server"]),
    dict(id="keylog-0600", file="session.py", property="3.10 the key log is created 0600",
         original="        fd = os.open(path, flags, 0o600)",
         replacement="        fd = os.open(path, flags, 0o644)",
         tests=[TEXT + "test_keylog_lets_an_independent_tool_decrypt_a_capture"]),
    # --- issue 10: the handshake core finished ----------------------------------------------
    dict(id="step-guard-any-exception", file="crypt.py",
         property="3.4/3.5 a handshake fails for good on any error in a step, not only a "
                  "protocol error (a failing KEM provider, random source, bug)",
         original="            except BaseException:\n                self.state = failed",
         replacement="            except (AuthError, LocalProtocolError, RemoteProtocolError):\n"
                     "                self.state = failed",
         tests=["tests/test_core.py::test_any_failure_in_a_client_step_fails_the_handshake_for_good",
                "tests/test_core.py::test_any_failure_in_a_server_step_fails_the_handshake_for_good"]),
    dict(id="role-enum-checked", file="crypt.py",
         property="3.2/3.4 a role is crypt.Role: a mistyped string is an error, never the "
                  "other role's signature context or record directions",
         original="    if not isinstance(role, Role):", replacement="    if False:",
         tests=["tests/test_core.py::test_a_role_that_is_not_a_crypt_role_is_refused_everywhere"]),
    # --- issue 12: protocol version 2 ---------------------------------------------------------
    dict(id="commitment-checked", file="server_data.py",
         property="3.5 v2 the revealed nonce must open the ClientHello's commitment",
         original="        crypt.check_commitment(self._hello.commitment, auth.nonce)",
         replacement="        pass",
         tests=[CORE_T + "test_a_nonce_that_does_not_open_the_commitment_is_refused"]),
    dict(id="commitment-over-nonce", file="crypt.py",
         property="3.5 v2 the commitment is computed over the nonce",
         original="return hashlib.sha256(COMMITMENT_LABEL + nonce).digest()",
         replacement="return hashlib.sha256(COMMITMENT_LABEL).digest()",
         tests=[CORE_T + "test_client_hello_commits_to_the_nonce_the_client_auth_reveals"]),
    dict(id="code-bound-to-nonce", file="crypt.py",
         property="3.3 v2 the verification code is bound to the revealed nonce_c",
         original="digest = hmac.new(keys.verification, nonce, hashlib.sha256).digest()",
         replacement="digest = hmac.new(keys.verification, bytes(NONCE_SIZE), "
                     "hashlib.sha256).digest()",
         tests=[CORE_T + "test_a_grinding_man_in_the_middle_matches_the_code_only_by_chance",
                "tests/test_protocol_vector.py"]),
    dict(id="client-identity-sealed", file="crypt.py",
         property="3.5 v2 the client's identity is sealed under a secret key, never in clear",
         original="    return DIRECTION_C2S, keys.auth_enc, keys.auth_mac, keys.auth_iv",
         replacement="    return DIRECTION_C2S, bytes(KEY_SIZE), keys.auth_mac, keys.auth_iv",
         tests=[CORE_T + "test_client_identity_is_absent_from_the_plaintext_handshake",
                "tests/test_protocol_vector.py"]),
    dict(id="key-update-new-secret", file="crypt.py",
         property="3.4 KeyUpdate derives the next epoch's secret",
         original="        self._secret = next_traffic_secret(self._secret)\n",
         replacement="        self._secret = self._secret\n",
         tests=[CORE_T + "test_key_update_ratchets_the_traffic_secret_as_documented",
                CORE_T + "test_a_record_under_the_old_key_after_an_update_is_refused"]),
    dict(id="key-update-old-key-refused", file="crypt.py",
         property="3.4 after a KeyUpdate a record under the old key is refused",
         original="        self._install(*traffic_keys(self._secret))\n",
         replacement="        self.seq = 0\n",
         tests=[CORE_T + "test_a_record_under_the_old_key_after_an_update_is_refused"]),
    dict(id="key-update-at-limit", file="crypt.py",
         property="3.4 a KeyUpdate at the latest at the epoch's last record",
         original="return self.seq >= self.limit - 1 or now",
         replacement="return now",
         tests=[CORE_T + "test_key_update_is_due_at_the_record_limit_and_after_an_hour"]),
    dict(id="key-update-limit-enforced", file="crypt.py",
         property="3.4 a peer that does not update its key in time is refused",
         original="        if self.seq >= self.limit:\n            raise RemoteProtocolError(",
         replacement="        if False:\n            raise RemoteProtocolError(",
         tests=["tests/test_key_update.py::test_without_the_updates_the_receiver_refuses_the_session"]),
    dict(id="key-update-time-rule", file="crypt.py",
         property="3.4 a KeyUpdate at the latest after an hour of one epoch",
         original=" or now - self._epoch_start >= KEY_UPDATE_SECONDS",
         replacement="",
         tests=[CORE_T + "test_key_update_is_due_at_the_record_limit_and_after_an_hour"]),
    dict(id="key-update-epoch-clock", file="crypt.py",
         property="3.4 the hour counts from the epoch's start (reset by each update)",
         original="        self._epoch_start = now\n        return pieces",
         replacement="        return pieces",
         tests=[CORE_T + "test_key_update_is_due_at_the_record_limit_and_after_an_hour"]),
    dict(id="v1-client-gets-bad-version", file="server.py",
         property="3.5 a version 1 client is told BAD_VERSION, never served",
         original="why, alert = str(e), Alert(AlertCode.BAD_VERSION, str(e))",
         replacement="why, alert = str(e), Alert(AlertCode.BAD_MESSAGE, str(e))",
         tests=["tests/test_e2e_version.py::test_a_version_1_client_is_refused_with_bad_version"]),
    dict(id="v1-server-gets-bad-version", file="client.py",
         property="3.5 a version 1 server is told BAD_VERSION and the client stops",
         original='tell_server(sock, Alert(AlertCode.BAD_VERSION, f"client speaks',
         replacement='tell_server(sock, Alert(AlertCode.BAD_MESSAGE, f"client speaks',
         tests=["tests/test_e2e_version.py::test_a_version_1_server_gets_one_message_and_exit_3"]),
    dict(id="server-alert-by-code", file="protocol.py",
         property="3.9 a plaintext Alert is shown by its code's meaning only (server log)",
         original='super().__init__(f"peer refused: {ALERT_MEANING[alert.code]}")',
         replacement='super().__init__(f"peer refused: {alert.reason}")',
         tests=["tests/test_e2e_version.py::test_a_client_alert_is_logged_by_its_code_meaning_only"]),
    # --- issue 9: resources and local safety ------------------------------------------------
    dict(id="send-deadline", file="session.py",
         property="3.7 a writer that makes no progress ends the session (send deadline)",
         original="        set_send_deadline(self.sock, self.send_timeout)",
         replacement="        pass",
         tests=[RESOURCES + "test_a_writer_that_makes_no_progress_ends_the_session_on_its_own"]),
    dict(id="shutdown-before-close", file="session.py",
         property="3.7 shutdown() before close() wakes blocked threads",
         original="    shut_down(sock)\n    exit_by = time.monotonic() + EXIT_TIMEOUT",
         replacement="    exit_by = time.monotonic() + EXIT_TIMEOUT",
         tests=[RESOURCES + "test_closing_always_shuts_the_socket_down_first"]),
    dict(id="accept-back-off", file="server.py",
         property="3.7 accept() failing (EMFILE...) backs off instead of spinning",
         original="                self.back_off(backoff)",
         replacement="                pass",
         tests=[RESOURCES + "test_accept_failing_for_lack_of_resources_backs_off_then_serves"]),
    dict(id="thread-start-failure", file="server.py",
         property="3.7 a thread that cannot start refuses that connection only (slot freed)",
         original="            self.admission.release_slot()\n"
                  "            self.log(f\"connection from {peer} "
                  "refused: cannot serve it",
         replacement="            self.log(f\"connection from {peer} refused: cannot serve it",
         tests=[RESOURCES + "test_a_thread_that_cannot_start_refuses_that_connection_only"]),
    dict(id="per-source-limit", file="server.py",
         property="3.7 one address holds at most --max-startups-per-source handshakes",
         original="            if n >= self.max_startups_per_source:",
         replacement="            if False:",
         tests=[RESOURCES + "test_one_address_cannot_hold_more_than_its_share_of_handshakes"]),
    dict(id="per-source-released", file="server.py",
         property="3.7 a finished handshake no longer counts against its address",
         original="            self.handshake_ended = True\n"
                  "            self.server.admission.end_handshake(self.source)",
         replacement="            self.handshake_ended = True\n            pass",
         tests=[RESOURCES + "test_one_address_cannot_hold_more_than_its_share_of_handshakes"]),
    dict(id="slot-after-threads", file="server.py",
         property="3.7 a --max-clients slot is free only once its session's threads ended",
         # moved, not repeated: released once the handshake is over instead of at the end
         original=SERVE_TAIL,
         replacement=SERVE_TAIL.removesuffix("            srv.admission.release_slot()\n")
         .replace("                self.end_handshake()\n",
                  "                self.end_handshake()\n"
                  "                srv.admission.release_slot()\n"),
         tests=[RESOURCES + "test_a_sessions_slot_is_free_only_once_its_threads_have_ended"]),
    dict(id="refused-not-recorded", file="server.py",
         property="3.7 a client refused by --authorized-clients is not recorded",
         original="            # logged, not recorded: strangers must not grow a file on our "
                  "disk\n",
         replacement="            srv.record_client(fp, peer)\n",
         tests=[RESOURCES
                + "test_a_client_refused_by_authorized_clients_is_logged_but_not_recorded"]),
    dict(id="known-clients-cap", file="keystore.py",
         property="3.7 known_clients stops growing at its limit",
         original="        if len(self.seen) >= self.limit:",
         replacement="        if False:",
         tests=[RESOURCES + "test_known_clients_stops_growing_at_its_limit_with_one_warning"]),
    dict(id="keylog-nofollow", file="session.py",
         property="3.10 the key log is never written through a symbolic link",
         original="os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC\n",
         replacement="os.O_APPEND | os.O_CLOEXEC\n",
         tests=[SAFETY + "test_an_unsafe_keylog_is_refused_untouched_and_the_session_goes_on"]),
    dict(id="keylog-private", file="session.py",
         property="3.10 a key log readable by group or others is refused",
         original="    if st.st_mode & 0o077:",
         replacement="    if st.st_mode & 0o000:",
         tests=[SAFETY + "test_an_unsafe_keylog_is_refused_untouched_and_the_session_goes_on"]),
    dict(id="keylog-foreign-owner", file="session.py",
         property="3.10 a key log owned by another user is refused",
         original="    if st.st_uid != os.geteuid():",
         replacement="    if False:",
         tests=[SAFETY + "test_an_unsafe_keylog_is_refused_untouched_and_the_session_goes_on"]),
    dict(id="strictmodes-owner", file="keystore.py",
         property="3.6 StrictModes: a home or home file owned by another user is refused",
         original="    if st.st_uid not in (me, 0):",
         replacement="    if False:",
         tests=[SAFETY + "test_a_home_or_home_file_owned_by_another_user_is_refused"]),
    dict(id="seal-commits-sequence", file="crypt.py",
         property="3.4 a record's sequence number is used up only once it is sealed",
         original="        seq, iv, mac = self._peek()\n        # CTR",
         replacement="        seq, iv, mac = self._next()\n        # CTR",
         tests=[SAFETY + "test_an_exception_inside_seal_uses_up_no_sequence_number"]),
    dict(id="writer-direct-overtakes", file="session.py",
         property="3.4 records leave in sequence order (a direct send never overtakes the queue)",
         original="direct = not (self._waiting or self._failed or self._ended)",
         replacement="direct = not (self._failed or self._ended)",
         tests=["tests/test_socket_writer.py::"
                "test_a_record_put_while_one_waits_for_the_writer_goes_behind_it"]),
    dict(id="writer-direct-after-end", file="session.py",
         property="3.4 nothing is sent after the session's last record (end of the writer)",
         original="direct = not (self._waiting or self._failed or self._ended)",
         replacement="direct = not (self._waiting or self._failed)",
         tests=["tests/test_socket_writer.py::test_nothing_goes_out_after_end"]),
    dict(id="signal-sets-a-flag", file="session.py",
         property="3.4 SIGINT/SIGTERM only set a flag (no exception mid-record)",
         original="        self.event.set()\n        if self._at_prompt:",
         replacement="        self.event.set()\n        if True:",
         tests=[SAFETY + "test_a_signal_outside_a_prompt_only_sets_the_flag"]),
    dict(id="o-tmpfile-used", file="transfer.py",
         property="3.8 an incoming file is an unnamed O_TMPFILE file where supported",
         original="    if not (USE_O_TMPFILE and flag and _have_proc_fds()):",
         replacement="    if True:",
         tests=["tests/test_transfer.py::test_a_full_receive_writes_the_exact_bytes",
                SAFETY + "test_a_receiver_killed_mid_transfer_leaves_no_file"]),
    dict(id="fallback-temp-locked", file="transfer.py",
         property="3.8 the named fallback temp file is locked while it is written",
         original="        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
                  "    except BlockingIOError:",
         replacement="        pass\n    except BlockingIOError:",
         tests=[SAFETY + "test_a_live_fallback_temp_file_survives_a_clean_up_and_is_saved"]),
    dict(id="stale-temps-unlocked-only", file="transfer.py",
         property="3.8 the start-up clean-up removes only temp files no process holds",
         original="                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
                  "            except BlockingIOError:",
         replacement="                pass\n            except BlockingIOError:",
         tests=[SAFETY + "test_start_up_clean_up_removes_only_unlocked_temp_files_of_ours"]),
    dict(id="timeout-flag-nan", file="session.py",
         property="3.7 timeout flags must be finite numbers above 0 (nan refused)",
         original="    if not (0 < value <= MAX_SECONDS):  # also false for nan",
         replacement="    if value <= 0 or value > MAX_SECONDS:  # also false for nan",
         tests=[SAFETY + "test_a_bad_flag_value_is_one_usage_error"]),
    # --- issue 13: photo metadata -----------------------------------------------------------
    dict(id="strip-drops-exif", file="transfer.py",
         property="3.11 stripping removes EXIF (GPS, serials, make and model)",
         original="    if marker == M_APP1 and body.startswith(ID_EXIF):\n        return False",
         replacement="    if marker == M_APP1 and body.startswith(ID_EXIF):\n        return True",
         tests=[METADATA + "test_a_photo_with_everything_is_described_and_stripped_losslessly"]),
    dict(id="strip-keeps-orientation", file="transfer.py",
         property="3.11 stripping keeps the orientation",
         original="        pieces.insert(exif_at, minimal_exif(orientation))",
         replacement="        pass",
         tests=[METADATA + "test_a_photo_with_everything_is_described_and_stripped_losslessly"]),
    dict(id="strip-keeps-icc", file="transfer.py",
         property="3.11 stripping keeps the ICC profile",
         original="    if marker == M_APP2 and body.startswith(ID_ICC):\n        return True",
         replacement="    if marker == M_APP2 and body.startswith(ID_ICC):\n        return False",
         tests=[METADATA + "test_a_photo_with_everything_is_described_and_stripped_losslessly"]),
    dict(id="strip-keeps-adobe", file="transfer.py",
         property="3.11 stripping keeps the Adobe segment (CMYK)",
         original="    if marker == M_APP14 and body.startswith(ID_ADOBE):\n        return True",
         replacement="    if marker == M_APP14 and body.startswith(ID_ADOBE):\n"
                     "        return False",
         tests=[METADATA + "test_a_cmyk_photo_keeps_its_adobe_segment"]),
    dict(id="location-default-without", file="session.py",
         property="3.11 the location question's default (Enter) is without metadata",
         original='        if answer in ("", "1", "without"):',
         replacement='        if answer in ("1", "without"):',
         tests=["tests/test_interactive.py::"
                "test_client_menu_names_what_photos_carry_and_asks_before_a_location_leaves"]),
    dict(id="strip-refuses-unparseable", file="client.py",
         property="3.11 --strip-metadata refuses a photo it cannot parse (batch)",
         original="                    session.stripped_outgoing(out)",
         replacement="                    pass",
         tests=[METADATA + "test_batch_strip_metadata_refuses_a_photo_it_cannot_parse"]),
    dict(id="strip-plan-of-another-file", file="transfer.py",
         property="3.11 a photo replaced after its check is not stripped by its old plan",
         original='        unchanged(out, st, "since it was checked")',
         replacement="        pass",
         tests=["tests/test_e2e_batch.py::"
                "test_a_strip_plan_is_made_only_for_the_file_that_was_checked"]),
    dict(id="send-a-changed-file", file="session.py",
         property="3.8 a file that grew or changed after its check is not sent cut or mixed",
         original="            transfer.unchanged(out, os.fstat(f.fileno()), when)",
         replacement="            pass",
         tests=["tests/test_e2e_batch.py::"
                "test_a_file_changed_after_its_check_is_cancelled_not_sent_as_another"]),
    # --- issue 15: several files in flight ------------------------------------------------------
    dict(id="file-window", file="session_core.py",
         property="3.7 bounded resources: an offer beyond the file window is a protocol error",
         original="if not _in_window(self.files, msg.size, WINDOW_FILES, WINDOW_BYTES):",
         replacement="if False:",
         tests=["tests/test_session_core.py"]),
    dict(id="dir-fsync-before-saved", file="session.py",
         property="3.8 a received file's directory is flushed before FileSaved",
         original="transfer.flush_dir(self._conn.received_dir)  # before any FileSaved",
         replacement="pass  # before any FileSaved",
         tests=["tests/test_e2e_batch.py::test_each_file_is_in_a_flushed_directory_before_it_is_reported_saved"]),
    dict(id="early-flush-error-kept", file="transfer.py",
         property="3.8 a failed fsync is never hidden by a later one that succeeds",
         original="                raise self._flush_error\n",
         replacement="                pass\n",
         tests=["tests/test_transfer.py"]),
    dict(id="per-source-before-log", file="server.py",
         property="3.7 a failed handshake gives its address back before its line is logged",
         original="        self.end_handshake()\n"
                  "        srv.log(f\"connection from {self.peer} closed:",
         replacement="        srv.log(f\"connection from {self.peer} closed:",
         tests=["tests/test_resources.py::test_a_failed_handshake_gives_its_address_back_before_its_line_is_logged"]),
    dict(id="file-op-order", file="session_core.py",
         property="3.7 one stream at a time in offer order (data of another file is an error)",
         original="if f.state in streaming or f.state in (Outbound.ACCEPT, Inbound.OFFERED):",
         replacement="if False:",
         tests=["tests/test_session_core.py"]),
]

FIELDS = ("id", "file", "original", "replacement", "tests", "property")
SUBSET_TIMEOUT = 300
IGNORE = shutil.ignore_patterns(".venv", ".git", "__pycache__", ".pytest_cache", ".ruff_cache",
                                ".hypothesis", "*.pyc")


def problems(root: Path = ROOT) -> list[str]:
    """What is wrong with the list against the tree at `root` (empty when all is well)."""
    out = []
    seen = set()
    for m in MUTANTS:
        mid = m.get("id", "?")
        if tuple(sorted(m)) != tuple(sorted(FIELDS)):
            out.append(f"{mid}: fields {sorted(m)}, expected {sorted(FIELDS)}")
            continue
        if mid in seen:
            out.append(f"{mid}: duplicate id")
        seen.add(mid)
        if m["original"] == m["replacement"] or not m["tests"]:
            out.append(f"{mid}: replacement equals the original, or no tests")
        path = root / m["file"]
        text = path.read_text(encoding="utf-8") if path.is_file() else ""
        count = text.count(m["original"])
        if count != 1:
            out.append(f"{mid}: original snippet occurs {count} times in {m['file']}, "
                       f"expected once (code moved? update tests/mutants.py)")
        else:
            try:  # a mutant must be a working program that is wrong, not a syntax error
                compile(text.replace(m["original"], m["replacement"]), m["file"], "exec")
            except SyntaxError as e:
                out.append(f"{mid}: the mutated {m['file']} does not compile: {e.msg}")
        for test in m["tests"]:
            file, _, name = test.partition("::")
            test_path = root / file
            if not test_path.is_file():
                out.append(f"{mid}: no test file {file}")
            elif name and not re.search(rf"^def {re.escape(name)}\(", test_path.read_text(
                    encoding="utf-8"), re.M):
                out.append(f"{mid}: no test {name} in {file}")
    return out


def pytest(scratch: Path, args: list[str], stop: bool = True) -> tuple[int, str]:
    argv = [sys.executable, "-m", "pytest", *(["-x"] if stop else []), "-q",
            "-p", "no:cacheprovider", "-rf", *args]
    try:
        r = subprocess.run(argv, cwd=scratch, capture_output=True, text=True,
                           timeout=SUBSET_TIMEOUT,
                           env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    except subprocess.TimeoutExpired:
        return -1, "timed out"
    return r.returncode, r.stdout + r.stderr


def where(m: dict) -> str:
    text = (ROOT / m["file"]).read_text(encoding="utf-8")
    return f"{m['file']}:{text[: text.index(m['original'])].count(chr(10)) + 1}"


def killers(output: str) -> list[str]:
    return re.findall(r"^FAILED (.+?)(?: - .*)?$", output, re.M) or ["?"]


def run_one(scratch: Path, m: dict, every: bool = False) -> tuple[str, str]:
    """(outcome, detail): outcome is 'killed', 'SURVIVED' or 'ERROR'.  With `every`,
    the subset runs to the end and detail names every test that failed."""
    path = scratch / m["file"]
    pristine = path.read_text(encoding="utf-8")
    path.write_text(pristine.replace(m["original"], m["replacement"], 1), encoding="utf-8")
    try:
        # its subset, then the whole suite (but for the check of this list, which any
        # mutant "fails" by changing its snippet)
        for args in (m["tests"], ["--ignore=tests/test_mutants_list.py"]):
            code, output = pytest(scratch, args, stop=not every)
            if code == 1:
                return "killed", ", ".join(killers(output))
            if code != 0:
                tail = output.strip().splitlines()[-1:] or ["?"]
                return "ERROR", f"pytest exit {code}: {tail[0][:60]}"
        return "SURVIVED", ""
    finally:
        path.write_text(pristine, encoding="utf-8")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("ids", nargs="*", help="run only these mutants")
    p.add_argument("--markdown", metavar="FILE",
                   help="also write the table as Markdown to FILE (for the README)")
    p.add_argument("--every", action="store_true",
                   help="run each subset to the end and list every test that kills the mutant")
    args = p.parse_args(argv)
    wrong = problems()
    if wrong:
        print("error: the mutant list does not match the code:", *wrong, sep="\n  ")
        return 1
    chosen = [m for m in MUTANTS if not args.ids or m["id"] in args.ids]
    if args.ids and len(chosen) != len(set(args.ids)):
        print(f"error: unknown mutant id among {args.ids}")
        return 2
    start = time.monotonic()
    failures = 0
    rows = ["| Mutant | Where | Property guarded (DESIGN.md §3) | Result: killed by |",
            "|---|---|---|---|"]
    with tempfile.TemporaryDirectory(prefix="qsocket-mutants-") as tmp:
        scratch = Path(tmp) / "tree"
        shutil.copytree(ROOT, scratch, ignore=IGNORE)
        # the unmutated tree must pass every subset, or a "kill" proves nothing
        subsets = sorted({t for m in chosen for t in m["tests"]})
        code, output = pytest(scratch, subsets)
        if code != 0:
            print(f"error: the unmutated tree fails its subsets (pytest exit {code}):\n{output}")
            return 1
        print(f"unmutated subsets pass ({time.monotonic() - start:.0f} s)\n")
        print(f"{'mutant':26} {'where':18} {'result':8} killed by")
        for m in chosen:
            t0 = time.monotonic()
            outcome, detail = run_one(scratch, m, args.every)
            failures += outcome != "killed"
            print(f"{m['id']:26} {where(m):18} {outcome:8} {detail}  "
                  f"({time.monotonic() - t0:.1f} s)", flush=True)
            shown = f"`{detail.removeprefix('tests/')}`" if outcome == "killed" else \
                f"**{outcome}** {detail}"
            rows.append(f"| `{m['id']}` | `{where(m)}` | {m['property']} | {shown} |")
    total = time.monotonic() - start
    summary = f"{len(chosen) - failures} of {len(chosen)} mutants killed in {total:.0f} s"
    print(summary)
    if args.markdown:
        Path(args.markdown).write_text("\n".join([*rows, "", summary, ""]), encoding="utf-8")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
