"""Accounts over the API, for admins only: who may sign in, with which role (never a token or a
password). Accounts are made on the server with `pneumoscreen users`."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Path, Request
from sqlalchemy.orm import Session

from db.accounts import NAME_PATTERN, AccountError, Role, disable_account, list_accounts
from worker import runtime
from worker.api.auth import BearerAuth, require_role
from worker.api.schemas import AccountOut, ErrorDetail

SessionDep = Annotated[Session, Depends(runtime.request_session)]


def accounts_router(auth: BearerAuth) -> APIRouter:
    admin = require_role(auth, Role.ADMIN)
    router = APIRouter(dependencies=[Depends(auth), Depends(admin)], tags=["accounts"],
                       responses={401: {"model": ErrorDetail, "description": "missing or wrong bearer token"},
                                  403: {"model": ErrorDetail, "description": "only an admin manages accounts"}})

    @router.get("/accounts", response_model=list[AccountOut], summary="Every account and its role")
    def get_accounts(request: Request, session: SessionDep) -> list[dict[str, Any]]:
        rows = list_accounts(session)
        request.state.result_count = len(rows)
        return rows

    @router.post("/accounts/{name}/disable", response_model=AccountOut, summary="Disable an account",
                 responses={404: {"model": ErrorDetail, "description": "no such account"}})
    def post_disable(session: SessionDep,
                     name: Annotated[str, Path(max_length=64, pattern=NAME_PATTERN.pattern)]) -> dict[str, Any]:
        """Its token, password and web sessions stop working at once."""
        try:
            disable_account(session, name=name)
        except AccountError as exc:
            raise HTTPException(404, str(exc)) from None
        session.commit()
        return next(row for row in list_accounts(session) if row["name"] == name)

    return router
