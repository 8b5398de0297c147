"""quiet_pydicom is used by concurrent report builds and stage requests in one process: overlapping
uses from several threads must leave pydicom's validation mode and log level as they were."""

import logging
import threading

import pydicom

from services.preprocess.reader import quiet_pydicom


def test_overlapping_quiet_periods_in_threads_restore_pydicom_settings():
    before_mode = pydicom.config.settings.reading_validation_mode
    before_level = logging.getLogger("pydicom").level
    first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def first():
        with quiet_pydicom():
            first_in.set()
            second_in.wait(10)
        first_out.set()  # leaves while the second is still inside

    def second():
        first_in.wait(10)
        with quiet_pydicom():
            second_in.set()
            first_out.wait(10)
            seen["mode_inside"] = pydicom.config.settings.reading_validation_mode

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert seen["mode_inside"] == pydicom.config.IGNORE  # still quiet after the first one left
    assert pydicom.config.settings.reading_validation_mode == before_mode
    assert logging.getLogger("pydicom").level == before_level


def test_nested_quiet_periods_restore_on_the_outer_exit():
    before_mode = pydicom.config.settings.reading_validation_mode
    with quiet_pydicom():
        with quiet_pydicom():
            pass
        assert pydicom.config.settings.reading_validation_mode == pydicom.config.IGNORE
    assert pydicom.config.settings.reading_validation_mode == before_mode
