from django.apps import AppConfig


class ForecastingConfig(AppConfig):
    name = "apps.forecasting"
    verbose_name = "Load series, forecasts and autoscaling"
