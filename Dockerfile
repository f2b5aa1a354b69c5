# One image for every pneumoscreen service; EXTRAS=gpu builds the GPU inference image.
FROM python:3.11-slim
ARG EXTRAS=""
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PNEUMOSCREEN_DATA_DIR=/data
RUN useradd --create-home --uid 10001 pneumoscreen && mkdir /data && chown pneumoscreen /data
WORKDIR /app
COPY pyproject.toml README.md ./
COPY worker ./worker
COPY dicom_io ./dicom_io
COPY model ./model
COPY db ./db
RUN pip install ".${EXTRAS:+[$EXTRAS]}"
USER pneumoscreen
VOLUME ["/data"]
EXPOSE 11112
ENTRYPOINT []
CMD ["pneumoscreen", "--help"]
