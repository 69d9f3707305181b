from django.apps import AppConfig


class PulseDemoConfig(AppConfig):
    name = "pulse_demo"

    def ready(self):
        from pulse_demo import receivers  # noqa: F401 - connects the receivers
