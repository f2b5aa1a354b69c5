"""Verdicts over the API: a radiologist (or an admin) records what a study showed; every change
is kept with who and when, and the study's JSON shows the current verdict and its history."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Path
from pydantic import BaseModel, ConfigDict
from sqlalchemy.orm import Session

from db.accounts import Role
from db.verdicts import Finding, UnknownStudy, VerdictSource, record_verdict, study_verdicts
from worker import runtime
from worker.api.auth import BearerAuth, Principal, require_role
from worker.api.schemas import UID_PATTERN, ErrorDetail, StudyVerdicts


class VerdictIn(BaseModel):
    """What the study shows, in the reader's judgement."""

    model_config = ConfigDict(extra="forbid")

    finding: Finding


def record(session: Session, principal: Principal, study_instance_uid: str, finding: Finding) -> dict[str, Any]:
    """Record ``principal``'s verdict (committed) and return the study's verdicts; 404 for an unknown study."""
    try:
        record_verdict(session, study_instance_uid=study_instance_uid, finding=finding,
                       source=VerdictSource.RADIOLOGIST, actor=principal.actor,
                       account=_account(session, principal))
    except UnknownStudy as exc:
        raise HTTPException(404, str(exc)) from None
    session.commit()
    return study_verdicts(session, study_instance_uid=study_instance_uid)


def _account(session: Session, principal: Principal):
    from db.models import Account

    return None if principal.account_id is None else session.get(Account, principal.account_id)


def verdicts_router(auth: BearerAuth) -> APIRouter:
    router = APIRouter(dependencies=[Depends(auth)], tags=["results"],
                       responses={401: {"model": ErrorDetail, "description": "missing or wrong bearer token"}})
    may_record = require_role(auth, Role.RADIOLOGIST)

    @router.post("/studies/{study_instance_uid}/verdict", response_model=StudyVerdicts,
                 summary="Record a radiologist's verdict on a study",
                 responses={403: {"model": ErrorDetail, "description": "the account's role may not record verdicts"},
                            404: {"model": ErrorDetail, "description": "no such study"}})
    def post_verdict(
        body: VerdictIn,
        session: Annotated[Session, Depends(runtime.request_session)],
        study_instance_uid: Annotated[str, Path(max_length=64, pattern=UID_PATTERN, description="StudyInstanceUID")],
        principal: Principal = Depends(may_record),
    ) -> dict[str, Any]:
        """A radiologist's (or an admin's) finding, ``pneumonia`` or ``normal``. A later one changes the
        study's verdict; every one is kept. A radiologist's verdict wins over the RIS's final report."""
        return record(session, principal, study_instance_uid, body.finding)

    return router
